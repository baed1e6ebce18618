"""``rahf baseline sft|dpo``: the same flags and config as ``rahf align``, another trainer."""

from __future__ import annotations

import argparse
import dataclasses

from rahf.config import AlignConfig

_HELP = {
    "sft": "supervised fine-tuning on the chosen replies (TRL SFTTrainer)",
    "dpo": "direct preference optimisation, reference = the starting model (TRL DPOTrainer)",
}


def baseline_config(args: argparse.Namespace, method: str) -> AlignConfig:
    """align's config from the flags; ``--max-steps`` also caps ``baseline.train``, and the run
    folder defaults to ``runs/<method>`` instead of align's ``runs/rahf``."""
    from rahf.commands import config_from_args

    extra = [f"baseline.train.max_steps={args.max_steps}"] if args.max_steps is not None else []
    config = config_from_args(args, extra)
    align_default = next(f.default for f in dataclasses.fields(AlignConfig) if f.name == "run_dir")
    if args.run_dir is None and config.run_dir == align_default:
        config.run_dir = f"runs/{method}"
    return config


def cmd_baseline(args: argparse.Namespace) -> int:
    from rahf.baselines import train_dpo, train_sft
    from rahf.commands import push_final

    train = {"sft": train_sft, "dpo": train_dpo}[args.baseline]
    if args.push_to_hub:
        from rahf.export import check_push_target

        check_push_target(args.push_to_hub)
    push_final(args, train(baseline_config(args, args.baseline), overwrite=args.overwrite))
    return 0


def register(subparsers) -> None:
    from rahf.commands import add_align_arguments, add_push_arguments

    baseline = subparsers.add_parser(
        "baseline",
        help="train an SFT or DPO baseline on the same data and outputs as align",
        description="Baselines for comparison with RAHF: data -> training -> export into RUN_DIR/final, "
        "the layout `rahf align` writes. Settings live under `baseline.` in the config "
        "(e.g. --set baseline.beta=0.1). Rerunning skips finished stages and resumes interrupted ones.",
    )
    methods = baseline.add_subparsers(dest="baseline", metavar="METHOD", required=True)
    for name, text in _HELP.items():
        parser = methods.add_parser(name, help=text, description=f"{text}. Default --run-dir: runs/{name}.")
        add_align_arguments(parser)
        parser.add_argument("--overwrite", action="store_true", help="delete an existing run in --run-dir first")
        add_push_arguments(parser)
        parser.set_defaults(func=cmd_baseline)
