"""``rahf data ...`` commands: look at a preference dataset before spending compute on it."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
from typing import TYPE_CHECKING, Any

from rahf.config import AlignConfig
from rahf.config_loader import add_config_options, add_flags, flag, layers_from_args, load
from rahf.data.readers import load_preferences
from rahf.data.render import encode_prompt, encode_reply
from rahf.data.schema import LoadResult
from rahf.data.split import split_counts

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PROGRESS_MIN_PAIRS = 500  # show a progress bar when tokenising more pairs than this
SHOWN_INVALID_ROWS = 10  # invalid rows listed in the text report (--json lists all)
UNLIMITED = 1 << 30  # a token window that never truncates, for measuring full lengths


# `rahf data inspect` measures what `rahf align` would train on: its flags are align's keys.
INSPECT_FLAGS = [
    flag("--format", "data_format", help="row layout (default: detect it from the first row)"),
    flag("--columns", "data_columns", metavar="KEY=COLUMN,...",
         help="the file's column names, e.g. prompt=question,chosen=good,rejected=bad"),
    flag("--skip-invalid", switch=True, help="skip and count invalid rows instead of stopping at the first one"),
    flag("--model", help="model name or folder whose tokenizer measures lengths (default: smollm2)"),
    flag("--max-prompt-tokens", metavar="N", help="prompt token window to count truncations against (default: 256)"),
    flag("--max-reply-tokens", metavar="N",
         help="reply token window, EOS included, to count truncations against (default: align's, 64 for Dual)"),
    flag("--split", "data_split", help="split of a dataset dict or hub dataset (default: train)"),
    flag("--validation-fraction", metavar="F", help="share of prompts align holds out, for the split counts (default: 0.1)"),
    flag("--disjoint-share", "patterns.disjoint_share", metavar="F",
         help="patterns.disjoint_share: share of training prompts that feed only steps 2-3 (default: 0.5)"),
    flag("--seed", help="split seed, as align's seed (default: 0)"),
]


def inspect_config(args: argparse.Namespace) -> AlignConfig:
    """The align settings ``data inspect`` measures with: defaults <- --config <- --set <- flags <- DATA."""
    return load(AlignConfig, layers_from_args(args) + [("DATA", {"data": args.data})])


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``rahf data`` and its sub-commands to the top-level parser."""
    data = subparsers.add_parser(
        "data",
        help="inspect preference datasets (prompt / chosen / rejected)",
        description="Work with preference datasets: files (.jsonl[.gz], .json[.gz], .parquet, .csv, .tsv),"
        " folders written by datasets' save_to_disk, hub dataset ids, or 'builtin'.",
    )
    data.set_defaults(func=lambda args: _print_help(data))
    actions = data.add_subparsers(dest="data_command", metavar="ACTION")

    inspect = actions.add_parser(
        "inspect",
        help="load and check a dataset; report invalid rows, lengths and truncation",
        description="Load DATA with the same checks training uses, then report how many pairs"
        " loaded, invalid rows by reason, turns per prompt, token-length percentiles and how"
        " many prompts/replies the token windows would truncate.",
    )
    inspect.add_argument("data", metavar="DATA", help="a data file, saved dataset folder, hub id or 'builtin'")
    add_config_options(inspect, what="its data settings, windows and split are what align would use;"
                       " flags and --set override it", example="max_reply_tokens=128")
    add_flags(inspect, AlignConfig, INSPECT_FLAGS)
    inspect.add_argument("--json", action="store_true", help="print the report as one JSON object")
    inspect.add_argument("--config-name", help="hub dataset configuration name")
    inspect.add_argument("--limit", type=int, metavar="N", help="stop after N valid pairs")
    inspect.set_defaults(func=run_inspect)


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def run_inspect(args: argparse.Namespace) -> int:
    """Load, measure, print; all numbers come from ``inspect_report``."""
    from rahf.models import load_tokenizer

    config = inspect_config(args)
    result = load_preferences(
        config.data, format=config.data_format, skip_invalid=config.skip_invalid, split=config.data_split,
        config_name=args.config_name, limit=args.limit, columns=config.data_columns,
    )
    # keep stdout pure JSON: a first-use model conversion prints a note
    with contextlib.redirect_stdout(sys.stderr):
        tokenizer = load_tokenizer(config.model)
    report = inspect_report(
        result, tokenizer, max_prompt_tokens=config.max_prompt_tokens, max_reply_tokens=config.reply_window,
    )
    report["model"] = config.model
    report["split"] = split_counts(
        result.pairs, validation_fraction=config.validation_fraction, share=config.patterns.disjoint_share,
        seed=config.seed,
    )
    print(json.dumps(report, ensure_ascii=False) if args.json else format_report(report))
    return 0


def _percentiles(values: list[int]) -> dict[str, int]:
    """Nearest-rank percentiles: p50/p90/p99 are lengths that occur in the data."""
    ordered = sorted(values)
    rank = {q: ordered[max(math.ceil(q / 100 * len(ordered)) - 1, 0)] for q in (50, 90, 99)}
    return {"p50": rank[50], "p90": rank[90], "p99": rank[99], "max": ordered[-1]}


def inspect_report(
    result: LoadResult, tokenizer: PreTrainedTokenizerBase, *, max_prompt_tokens: int = 256, max_reply_tokens: int = 64
) -> dict[str, Any]:
    """The ``data inspect`` numbers: full token lengths, and truncations at the given windows.

    Turns count the user and assistant messages of a prompt (a system message is not a turn).
    Lengths are untruncated and include BOS (prompt) and EOS (replies).
    """
    from tqdm import tqdm

    lengths: dict[str, list[int]] = {"prompt": [], "chosen": [], "rejected": []}
    truncated = {"prompt": 0, "chosen": 0, "rejected": 0}
    bar = tqdm(
        result.pairs, desc="tokenising", unit="pair", file=sys.stderr,
        disable=len(result.pairs) <= PROGRESS_MIN_PAIRS,
    )
    for pair in bar:
        full, _ = encode_prompt(tokenizer, pair.prompt, max_prompt_tokens=UNLIMITED)
        lengths["prompt"].append(len(full))
        if len(full) > max_prompt_tokens:
            # run the real truncation: a window too small for the template fails here, not in training
            encode_prompt(tokenizer, pair.prompt, max_prompt_tokens=max_prompt_tokens, origin=pair.origin)
            truncated["prompt"] += 1
        for side in ("chosen", "rejected"):
            full, _ = encode_reply(tokenizer, getattr(pair, side), max_reply_tokens=UNLIMITED)
            lengths[side].append(len(full))
            truncated[side] += len(full) > max_reply_tokens  # exactly when encode_reply cuts
    turns = [sum(m["role"] != "system" for m in pair.prompt) for pair in result.pairs]
    return {
        "source": result.source,
        "pairs": len(result.pairs),
        "format": result.format,
        "invalid": dict(sorted(result.invalid.items())),
        "invalid_rows": [
            {"row": row, "field": field, "reason": reason} for row, field, reason in result.invalid_rows
        ],
        "turns": {"min": min(turns), "median": statistics.median(turns), "max": max(turns)},
        "tokens": {name: _percentiles(values) for name, values in lengths.items()},
        "truncation": {
            "max_prompt_tokens": max_prompt_tokens,
            "max_reply_tokens": max_reply_tokens,
            "prompts_truncated": truncated["prompt"],
            "chosen_truncated": truncated["chosen"],
            "rejected_truncated": truncated["rejected"],
        },
    }


def _share(count: int, total: int) -> str:
    return f"{count} ({100 * count / total:.1f}%)" if total else str(count)


def format_report(report: dict[str, Any]) -> str:
    """The human-readable form of ``inspect_report``'s dict."""
    n = report["pairs"]
    lines = [
        f"source:  {report['source']}",
        f"pairs:   {n}",
        f"format:  {report['format']}",
    ]
    invalid = report["invalid"]
    lines.append(f"invalid: {sum(invalid.values())}" + (" (skipped)" if invalid else ""))
    lines += [f"  {reason}: {count}" for reason, count in invalid.items()]
    rows = report["invalid_rows"]
    for item in rows[:SHOWN_INVALID_ROWS]:
        lines.append(f"  row {item['row']}, field '{item['field']}': {item['reason']}")
    if len(rows) > SHOWN_INVALID_ROWS:
        lines.append(f"  ... {len(rows) - SHOWN_INVALID_ROWS} more (see --json)")
    t = report["turns"]
    lines.append(f"turns per prompt: min {t['min']}, median {t['median']}, max {t['max']}")
    lines.append(f"tokens ({report.get('model', 'tokenizer')}):   p50    p90    p99    max")
    for name, p in report["tokens"].items():
        lines.append(f"  {name:<9}{p['p50']:>9}{p['p90']:>7}{p['p99']:>7}{p['max']:>7}")
    tr = report["truncation"]
    lines.append(
        f"truncated at max_prompt_tokens={tr['max_prompt_tokens']},"
        f" max_reply_tokens={tr['max_reply_tokens']}:"
    )
    lines.append(f"  prompts:  {_share(tr['prompts_truncated'], n)}")
    lines.append(f"  chosen:   {_share(tr['chosen_truncated'], n)}")
    lines.append(f"  rejected: {_share(tr['rejected_truncated'], n)}")
    if "split" in report:
        sp = report["split"]
        pairs, prompts = sp["pairs"], sp["prompts"]
        lines.append(
            f"split (validation_fraction={sp['validation_fraction']}, patterns.disjoint_share={sp['disjoint_share']},"
            f" seed={sp['seed']}): pairs (prompts)"
        )
        for name, label in (("train", "train"), ("validation", "validation"), ("step1", "  step 1"), ("patterns", "  steps 2-3")):
            lines.append(f"  {label:<12}{pairs[name]:>7} ({prompts[name]})")
        if not sp["disjoint_share"]:
            lines.append("  (disjoint_share 0: step 1 and steps 2-3 both use every training pair)")
    return "\n".join(lines)
