"""``rahf baseline sft|dpo``: align's run flags, the baseline's own config, another trainer.

The config is :class:`rahf.config.BaselineConfig`: the run settings align has too (model, data,
windows, run folder, ...) and the baseline's training settings as top-level keys (``train``,
``lora``, ``beta``, ...). Align-only flags and keys (``--alpha``, ``patterns.alpha``) fail in
one line that names ``rahf align``.
"""

from __future__ import annotations

import argparse

from rahf.config import BaselineConfig
from rahf.config_loader import add_config_options, add_flags, flag, layers_from_args, load

_HELP = {
    "sft": "supervised fine-tuning on the chosen replies (TRL SFTTrainer)",
    "dpo": "direct preference optimisation, reference = the starting model (TRL DPOTrainer)",
}


def baseline_flags() -> list:
    """The run flags, ``--max-steps`` for the baseline's budget, and align's own flags hidden
    (accepted only to fail with a message that names ``rahf align``)."""
    from rahf.commands import ALIGN_FLAGS, RUN_FLAGS

    own = [*RUN_FLAGS, flag("--max-steps", "train.max_steps", help="optimizer steps (overrides epochs)")]
    taken = {item.option for item in own}
    hidden = [flag(item.option, *item.keys, hidden=True) for item in ALIGN_FLAGS if item.option not in taken]
    return own + hidden


def add_baseline_arguments(parser: argparse.ArgumentParser, *, with_method: bool = True) -> None:
    """The flags of ``rahf baseline METHOD``; ``with_method`` adds METHOD as an optional
    positional (for ``rahf config baseline [sft|dpo]``)."""
    if with_method:
        parser.add_argument("baseline", nargs="?", choices=list(_HELP), default="sft", metavar="METHOD",
                            help="sft or dpo (default sft)")
    add_config_options(parser, example="train.learning_rate=1e-4")
    add_flags(parser, BaselineConfig, baseline_flags())


def baseline_config(args: argparse.Namespace) -> BaselineConfig:
    """The config of ``rahf baseline METHOD``: the sub-command sets ``method``, which also names
    the default run folder (``runs/<method>``)."""
    return load(BaselineConfig, layers_from_args(args, first=[(f"rahf baseline {args.baseline}", {"method": args.baseline})]))


def cmd_baseline(args: argparse.Namespace) -> int:
    from rahf.baselines import train_dpo, train_sft
    from rahf.commands import push_final

    train = {"sft": train_sft, "dpo": train_dpo}[args.baseline]
    if args.push_to_hub:
        from rahf.export import check_push_target

        check_push_target(args.push_to_hub)
    push_final(args, train(baseline_config(args), overwrite=args.overwrite))
    return 0


def register(subparsers) -> None:
    from rahf.commands import add_push_arguments

    baseline = subparsers.add_parser(
        "baseline",
        help="train an SFT or DPO baseline on the same data and outputs as align",
        description="Baselines for comparison with RAHF: data -> training -> export into RUN_DIR/final, "
        "the layout `rahf align` writes. Their own settings are top-level config keys "
        "(e.g. --set beta=0.1, --set train.learning_rate=1e-4; `rahf config baseline --markdown` lists them). "
        "Rerunning skips finished stages and resumes interrupted ones.",
    )
    methods = baseline.add_subparsers(dest="baseline", metavar="METHOD", required=True)
    for name, text in _HELP.items():
        parser = methods.add_parser(name, help=text, description=f"{text}. Default --run-dir: runs/{name}.")
        add_baseline_arguments(parser, with_method=False)
        parser.add_argument("--overwrite", action="store_true", help="delete an existing run in --run-dir first")
        add_push_arguments(parser)
        parser.set_defaults(func=cmd_baseline)
