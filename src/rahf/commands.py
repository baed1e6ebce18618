"""``rahf align``, ``rahf config`` and ``rahf demo``: parse, build the config, run the pipeline.

Flags are shortcuts for config keys (:class:`rahf.config_loader.Flag`); ``--config`` files and
``--set`` reach every key. Precedence: defaults <- ``--config`` files <- ``--set`` <- flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from typing import Any

from rahf.config import AlignConfig
from rahf.config_loader import add_config_options, add_flags, flag, layers_from_args, load

# Flags shared by align and baseline: the run settings (rahf.config.RunConfig).
RUN_FLAGS = [
    flag("--model"),
    flag("--data"),
    flag("--format", "data_format"),
    flag("--columns", "data_columns", metavar="KEY=COLUMN,...",
         help="the data's column names, e.g. prompt=question,chosen=good,rejected=bad"),
    flag("--skip-invalid", switch=True),
    flag("--run-dir"),
    flag("--seed"),
    flag("--max-pairs"),
    flag("--device"),
]
ALIGN_FLAGS = [
    flag("--method"),
    *RUN_FLAGS,
    flag("--target-layers", "patterns.target_layers", help="comma-separated hidden_states indices, e.g. 10,12,14"),
    flag("--alpha", "patterns.alpha"),
    flag("--max-steps", "step1.train.max_steps", "fit.train.max_steps",
         help="steps of every training stage (overrides epochs)"),
    flag("--targets", "fit.targets"),
    flag("--dual-storage", "step1.dual_storage"),
]


def add_align_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_options(parser)
    add_flags(parser, AlignConfig, ALIGN_FLAGS)


def align_config(args: argparse.Namespace) -> AlignConfig:
    return load(AlignConfig, layers_from_args(args))


def cmd_align(args: argparse.Namespace) -> int:
    from rahf.pipeline import align
    from rahf.preflight import format_plan, plan

    config = align_config(args)
    if args.dry_run:
        steps = plan(config)
        print(json.dumps(steps, indent=2) if args.json else format_plan(steps))
        return 0
    if args.push_to_hub:
        from rahf.export import check_push_target

        check_push_target(args.push_to_hub)  # before hours of training, not after
    final = align(config, overwrite=args.overwrite)
    push_final(args, final)
    return 0


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--push-to-hub", metavar="REPO",
        help="upload the result to this Hub model repo (owner/name): adapter and card at its root,"
        " merged weights in merged/; token from HF_TOKEN or `hf auth login`",
    )
    parser.add_argument("--hub-private", action="store_true", help="with --push-to-hub: create the repo private")


def push_final(args: argparse.Namespace, final) -> None:
    """``--push-to-hub``: upload a finished run's final folder (main process only)."""
    from rahf.io import is_main_process

    if getattr(args, "push_to_hub", None) and is_main_process():
        from rahf.export import push_to_hub

        print(f"rahf: pushed to {push_to_hub(final, args.push_to_hub, private=args.hub_private)}")


def cmd_demo(args: argparse.Namespace) -> int:
    from rahf.demo import run_demo

    run_demo(method=args.method, quick=args.quick, run_dir=args.run_dir, overrides=args.overrides)
    return 0


def markdown_table(rows: list[tuple[str, Any, str]]) -> str:
    """The config reference: one row per key (README's tables)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, help_text in rows:
        shown = "(required)" if default is dataclasses.MISSING else json.dumps(default)
        lines.append(f"| `{key}` | `{shown if len(shown) < 40 else '(long text)'}` | {help_text} |")
    return "\n".join(lines) + "\n"


def cmd_config(args: argparse.Namespace) -> int:
    """Print the resolved config of the command named (align by default), or its reference."""
    import yaml

    from rahf.config_loader import describe

    if args.markdown:
        print(markdown_table(describe(args.config_class)), end="")
        return 0
    config = args.resolve(args)
    print(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False), end="")
    return 0


# command -> (add its arguments, resolve its config from args, its config class)
Configurable = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], Any], type]


def configurable_commands() -> dict[str, Configurable]:
    from rahf.baselines.commands import add_baseline_arguments, baseline_config
    from rahf.config import BaselineConfig
    from rahf.evaluate.commands import (
        add_eval_arguments,
        add_train_rm_arguments,
        eval_config,
        train_rm_config,
    )
    from rahf.evaluate.settings import EvalConfig, RewardModelConfig

    return {
        "align": (add_align_arguments, align_config, AlignConfig),
        "baseline": (add_baseline_arguments, baseline_config, BaselineConfig),
        "eval": (add_eval_arguments, eval_config, EvalConfig),
        "train-rm": (add_train_rm_arguments, train_rm_config, RewardModelConfig),
    }


def _add_config_parser(subparsers, name: str, help_text: str, configurable: Configurable) -> argparse.ArgumentParser:
    add, resolve, cls = configurable
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    add(parser)
    parser.add_argument("--markdown", action="store_true", help="print the config reference as a Markdown table")
    parser.set_defaults(func=cmd_config, resolve=resolve, config_class=cls)
    return parser


def register(subparsers) -> None:
    align = subparsers.add_parser(
        "align",
        help="align a model with RAHF (SCIT or Dual)",
        description="Run the RAHF pipeline: data -> step 1 -> patterns -> LoRA fitting -> export. "
        "Rerunning the same command skips finished stages and resumes interrupted ones.",
    )
    add_align_arguments(align)
    align.add_argument("--overwrite", action="store_true", help="delete an existing run in --run-dir first")
    align.add_argument("--dry-run", action="store_true", help="validate data and config, print the plan, exit")
    align.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    add_push_arguments(align)
    align.set_defaults(func=cmd_align)

    commands = configurable_commands()
    config = _add_config_parser(
        subparsers, "config",
        "print the resolved configuration (defaults + files + --set + flags) as YAML: of `rahf align`"
        " (its flags follow directly), or of COMMAND (rahf config baseline dpo --beta 0.2)",
        commands["align"],
    )
    kinds = config.add_subparsers(dest="config_command", metavar="COMMAND")
    for name, configurable in commands.items():
        _add_config_parser(kinds, name, f"the config of `rahf {name}`", configurable)

    demo = subparsers.add_parser(
        "demo",
        help="align the embedded default model on the built-in data and show before/after",
        description="Train RAHF on SmolLM2-135M-Instruct (embedded) with the built-in preference set, "
        "then print held-out preference accuracy and example generations before and after. "
        "The settings are the packaged recipes demo-<method>[-quick] (`rahf config --config demo-dual`).",
    )
    demo.add_argument("--method", choices=["scit", "dual"], default="dual")
    demo.add_argument("--quick", action="store_true", help="a smaller budget (under 3 minutes on 2 CPU cores)")
    demo.add_argument("--run-dir", help="default runs/demo-<method>[-quick]")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a key of the demo's recipe (repeatable)")
    demo.set_defaults(func=cmd_demo)


__all__ = ["ALIGN_FLAGS", "RUN_FLAGS", "add_align_arguments", "align_config", "register"]
