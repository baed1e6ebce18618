"""``rahf align`` and ``rahf demo``: parse, build the config, run the pipeline."""

from __future__ import annotations

import argparse
import json

from rahf.config import load_config

# Flag -> config key. Flags are shortcuts for --set; the YAML file is the full reference.
_FLAGS = {
    "method": "method",
    "model": "model",
    "data": "data",
    "format": "data_format",
    "columns": "data_columns",
    "run_dir": "run_dir",
    "seed": "seed",
    "max_pairs": "max_pairs",
    "alpha": "patterns.alpha",
    "targets": "fit.targets",
    "dual_storage": "step1.dual_storage",
    "device": "device",
}


def add_align_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (see configs/); flags and --set override it")
    parser.add_argument("--method", choices=["scit", "dual"], help="RAHF variant (default dual)")
    parser.add_argument("--model", help="hub id, local model folder, or 'smollm2' (embedded default)")
    parser.add_argument("--data", help="preference data: file, folder, hub dataset id, or 'builtin'")
    parser.add_argument("--format", choices=["auto", "hh", "plain", "conversational", "ultrafeedback"])
    parser.add_argument("--columns", metavar="KEY=COLUMN,...",
                        help="the data's column names, e.g. prompt=question,chosen=good,rejected=bad")
    parser.add_argument("--skip-invalid", action="store_true", help="skip bad rows instead of failing")
    parser.add_argument("--run-dir", help="where stages write their outputs (default runs/rahf)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max-pairs", type=int, help="use at most this many training pairs")
    parser.add_argument("--target-layers", help="comma-separated hidden_states indices, e.g. 10,12,14")
    parser.add_argument("--alpha", type=float, help="target = orig + alpha * (preferred - dispreferred)")
    parser.add_argument("--max-steps", type=int, help="steps of every training stage (overrides epochs)")
    parser.add_argument("--targets", choices=["on-the-fly", "cached"], help="how step-3 targets are computed")
    parser.add_argument("--dual-storage", choices=["adapters", "full-copies"])
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override any config key, e.g. --set fit.train.learning_rate=1e-4 (repeatable)",
    )


def config_from_args(args: argparse.Namespace, extra: list[str] | None = None):
    overrides = list(extra or [])
    for flag, key in _FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value if not isinstance(value, str) else json.dumps(value)}")
    if getattr(args, "skip_invalid", False):
        overrides.append("skip_invalid=true")
    if getattr(args, "max_steps", None) is not None:
        overrides += [f"step1.train.max_steps={args.max_steps}", f"fit.train.max_steps={args.max_steps}"]
    if getattr(args, "target_layers", None):
        overrides.append(f"patterns.target_layers=[{args.target_layers}]")
    return load_config(args.config, overrides + list(args.overrides))


def cmd_align(args: argparse.Namespace) -> int:
    from rahf.pipeline import align
    from rahf.preflight import format_plan, plan

    config = config_from_args(args)
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


def cmd_config(args: argparse.Namespace) -> int:
    from rahf.config import describe

    if args.markdown:
        print("| key | default | meaning |\n|---|---|---|")
        for key, default, help_text in describe():
            print(f"| `{key}` | `{json.dumps(default) if len(json.dumps(default)) < 40 else '(long text)'}` | {help_text} |")
        return 0
    config = config_from_args(args)
    import yaml

    print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    return 0


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

    config = subparsers.add_parser(
        "config",
        help="print the resolved configuration (defaults + file + flags) as YAML",
        description="Print the configuration `rahf align` would use, or with --markdown the reference table of every key.",
    )
    add_align_arguments(config)
    config.add_argument("--markdown", action="store_true", help="print the config reference as a Markdown table")
    config.set_defaults(func=cmd_config)

    demo = subparsers.add_parser(
        "demo",
        help="align the embedded default model on the built-in data and show before/after",
        description="Train RAHF on SmolLM2-135M-Instruct (embedded) with the built-in preference set, "
        "then print held-out preference accuracy and example generations before and after.",
    )
    demo.add_argument("--method", choices=["scit", "dual"], default="dual")
    demo.add_argument("--quick", action="store_true", help="a smaller budget (under 3 minutes on 2 CPU cores)")
    demo.add_argument("--run-dir", help="default runs/demo-<method>[-quick]")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    demo.set_defaults(func=cmd_demo)
