"""CLI: ``rahf eval``, ``rahf eval compare``, ``rahf generate``, ``rahf train-rm``.

Each command parses its flags into the same dataclass the Python API takes, runs it, and prints;
no logic lives only here. ``eval`` and ``train-rm`` read their dataclass through
:mod:`rahf.config_loader`: defaults <- ``--config`` files <- ``--set key=value`` <- flags.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from rahf.config import ConfigError
from rahf.config_loader import (
    Flag,
    add_config_options,
    add_flags,
    field_flags,
    flag,
    given,
    layers_from_args,
    load,
)

EVAL_EPILOG = """\
usage patterns:
  rahf eval --model A [--baseline B] [--reference R] [--pairs FILE ...] [--prompts FILE ...]
            [--reward-model RM] [--limit N] [--max-new-tokens N] --out DIR
      evaluate A (and B) and write DIR/report.json, DIR/report.md, DIR/*.png, and
      DIR/generations.jsonl when prompts were given; DIR/report.html shows it all in a browser
      (tables, plots, replies side by side with scores and flags, a filter box; works offline)
  rahf eval compare DIR1 DIR2 ... [--out DIR]
      one table (printed) and, with --out, compare.md/compare.json/compare.png

--pairs, --prompts and --harmful-prompts may be repeated. Invalid rows of pair files are skipped
and counted in the report (--no-skip-invalid stops at the first one instead). Models: 'smollm2'
(embedded default), a save_pretrained folder, a hub id, or a PEFT adapter folder.
Prompt files: JSONL of {"prompt": ...}, {"messages": [...]}, or MT-Bench {"question_id", "turns"}.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``eval`` (with ``compare``), ``generate`` and ``train-rm``."""
    ev = subparsers.add_parser(
        "eval",
        help="evaluate a model: preference accuracy, generation, reward-model win rates, reports",
        description="Evaluate --model (against --baseline) and write a report folder; or compare"
        " several report folders with `rahf eval compare`.",
        epilog=EVAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_eval_arguments(ev)
    ev.set_defaults(func=cmd_eval)
    actions = ev.add_subparsers(dest="eval_command", metavar="{compare}")
    cmp = actions.add_parser(
        "compare",
        help="one table and one plot from several report folders",
        description="Read DIR/report.json of each folder; print one table; with --out also write"
        " compare.md, compare.json and compare.png.",
    )
    cmp.add_argument("reports", nargs="+", metavar="DIR", help="folders written by `rahf eval`")
    cmp.add_argument("--out", dest="compare_out", metavar="DIR", help="folder for compare.md/.json/.png")
    cmp.set_defaults(func=cmd_compare)

    gen = subparsers.add_parser(
        "generate",
        help="generate replies to prompts (greedy by default, cached)",
        description="Print a model's replies to --prompt texts and/or a --prompts file (JSONL of"
        " {prompt}, {messages} or MT-Bench {question_id, turns}; turns are answered in order).",
    )
    gen.add_argument("--model", default="smollm2", help="model name, folder, hub id or adapter folder")
    add_prompt_arguments(gen)
    _add_generation_arguments(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object per reply")
    add_steer_arguments(gen, required=False)
    gen.set_defaults(func=cmd_generate)

    rm = subparsers.add_parser(
        "train-rm",
        help="train a reward model (TRL RewardTrainer) on preference pairs",
        description="Train a sequence-classification reward model on DATA, split train/validation"
        " by prompt, save it (LoRA merged) to --out with metrics.json: held-out accuracy and the"
        " 'longer reply wins' baseline.",
    )
    add_train_rm_arguments(rm)
    rm.set_defaults(func=cmd_train_rm)


def add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    """``--prompt TEXT`` (repeatable), ``--prompts FILE`` and ``--limit N``: what to generate on."""
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a user prompt (repeatable)")
    parser.add_argument("--prompts", metavar="FILE", help="a prompt file (JSONL of {prompt}, {messages} or MT-Bench)")
    parser.add_argument("--limit", type=int, metavar="N", help="first N prompts of the file")


def prompt_items(args: argparse.Namespace) -> list:
    """The ``--prompt`` texts, then the ``--prompts`` file's items."""
    from rahf.evaluate.prompts import PromptItem, load_prompts

    items = [PromptItem(id=f"prompt-{i}", messages=({"role": "user", "content": text},))
             for i, text in enumerate(args.prompt)]
    if args.prompts:
        items += load_prompts(args.prompts, limit=args.limit).items
    return items


def add_steer_arguments(parser: argparse.ArgumentParser, *, required: bool) -> None:
    """``--steer FILE [--strength S] [--layers L,...]``: a vector added to the residual stream."""
    parser.add_argument("--steer", required=required, metavar="FILE",
                        help="a steering vector file (rahf scan / compose vectors.safetensors, or a llama.cpp"
                        " control-vector .gguf) added to the residual stream while generating")
    parser.add_argument("--strength", type=float,
                        help="multiples of the vector as read (default: the file's suggestion)")
    parser.add_argument("--layers", help="comma-separated hidden_states indices, e.g. 11,13,15 (default: the file's)")


def _add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="with --sample")
    parser.add_argument("--top-p", type=float, default=1.0, help="with --sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--instruction", help="system prompt placed before every prompt (rahf eval: for the"
                        " evaluated model only, when scoring pairs and generating)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-cache", dest="cache", action="store_false",
                        help="always generate (default: reuse replies cached on disk)")
    parser.add_argument("--cache-dir", help="generation cache folder (default: <rahf cache>/generations)")
    parser.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")


# Flags of `rahf eval`: one per EvalConfig field (help from the field), under these names.
EVAL_OPTIONS = {"do_sample": "--sample", "steer_strength": "--strength", "steer_layers": "--layers"}
EVAL_METAVARS = {
    "pairs": "FILE", "prompts": "FILE", "harmful_prompts": "FILE", "steer": "FILE", "reward_model": "RM",
    "out": "DIR", "cache_dir": "DIR", "columns": "KEY=COLUMN,...", "limit": "N", "max_new_tokens": "N",
    "max_prompt_tokens": "N", "max_reply_tokens": "N",
}
EVAL_HELPS = {
    "skip_invalid": "stop at the first invalid pair row (default: skip and count them)",
    "cache": "always generate (default: reuse replies cached on disk)",
    "temperature": "with --sample", "top_p": "with --sample",
    "steer_strength": "with --steer: multiples of the vector as read (default: the file's)",
    "steer_layers": "with --steer: hidden_states indices, e.g. 11,13,15 (default: the file's)",
}


def eval_flags() -> list[Flag]:
    from rahf.evaluate.settings import EvalConfig

    flags = field_flags(EvalConfig, skip={"progress"}, options=EVAL_OPTIONS, metavars=EVAL_METAVARS, helps=EVAL_HELPS)
    return [*flags, flag("--quiet", "progress", switch=True, value=False, help="no progress bars, no tables")]


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    from rahf.evaluate.settings import EvalConfig

    add_config_options(parser, example="resamples=200")
    add_flags(parser, EvalConfig, eval_flags())
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")


def eval_config(args: argparse.Namespace):
    """The EvalConfig of ``rahf eval``: defaults <- --config files <- --set <- flags."""
    from rahf.evaluate.settings import EvalConfig

    layers = layers_from_args(args)
    if not (given(layers, "model") and given(layers, "out")):
        raise ConfigError("rahf eval needs --model and --out (or: rahf eval compare DIR ...)")
    return load(EvalConfig, layers)


TRAIN_RM_FLAGS = [
    flag("--data", help="preference data file, folder, hub id or 'builtin'"),
    flag("--model", help="backbone (default: smollm2)"),
    flag("--out", metavar="DIR", help="folder for the reward model"),
    flag("--lora", "method", switch=True, value="lora", group="method",
         help="LoRA on all linear layers + score head (default)"),
    flag("--head-only", "method", switch=True, value="head-only", group="method",
         help="train only the score head on a frozen backbone (fast)"),
    flag("--lora-layers", metavar="N", help="LoRA only in the top N blocks (default: all; fewer is faster on a CPU)"),
    flag("--val-fraction", "validation_fraction", help="share of prompts held out (default 0.1)"),
    flag("--epochs", help="passes over the training pairs (default 1)"),
    flag("--max-steps", help="> 0 overrides --epochs"),
    flag("--lr", "learning_rate", help="learning rate (default 2e-4 LoRA, 1e-3 head-only)"),
    flag("--batch-size", help="pairs per step (default 8)"),
    flag("--limit", metavar="N", help="use the first N valid pairs"),
    flag("--max-length", help="tokens per (prompt, reply) input (default 512)"),
    flag("--max-reply-tokens", help="reply tokens per input (default 256)"),
    flag("--format", "data_format", help="data format (default: detect)"),
    flag("--columns", metavar="KEY=COLUMN,...",
         help="the data's column names, e.g. prompt=question,chosen=good,rejected=bad"),
    flag("--no-skip-invalid", "skip_invalid", switch=True, value=False,
         help="stop at the first invalid row instead of skipping it"),
    flag("--seed", help="seed of the split, the LoRA init and the data order (default 0)"),
]


def add_train_rm_arguments(parser: argparse.ArgumentParser) -> None:
    from rahf.evaluate.settings import RewardModelConfig

    add_config_options(parser, example="lora_r=8")
    add_flags(parser, RewardModelConfig, TRAIN_RM_FLAGS)


def train_rm_config(args: argparse.Namespace):
    """The RewardModelConfig of ``rahf train-rm``: defaults <- --config files <- --set <- flags."""
    from rahf.evaluate.settings import RewardModelConfig

    layers = layers_from_args(args)
    if not (given(layers, "data") and given(layers, "out")):
        raise ConfigError("rahf train-rm needs --data and --out (flags, --set or a --config file)")
    return load(RewardModelConfig, layers)


def cmd_eval(args: argparse.Namespace) -> int:
    from rahf.evaluate.report import to_markdown, write_report
    from rahf.evaluate.run import run_eval

    config = eval_config(args)
    report = run_eval(config)
    paths = write_report(config.out, report, plots=args.plots)
    if not args.quiet:
        print(to_markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from rahf.evaluate.report import compare_reports

    print(compare_reports(args.reports, args.compare_out))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from rahf.data.schema import DataError
    from rahf.evaluate.generation import GenerationCache, generate_turns
    from rahf.evaluate.loading import load_for_eval

    items = prompt_items(args)
    if not items:
        raise DataError("nothing to generate: give --prompt TEXT and/or --prompts FILE")
    model, tokenizer, info = load_for_eval(args.model, device=args.device)
    steer, model_id = contextlib.nullcontext(), info.fingerprint
    if args.steer:
        from rahf.steering.steer import steering_from_file

        open_steering, model_id = steering_from_file(model, args.steer, strength=args.strength, layers=args.layers,
                                                     model_id=model_id)
        steer = open_steering()
    with steer:
        turns = generate_turns(
            model, tokenizer, items, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
            temperature=args.temperature, top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
            instruction=args.instruction, cache=GenerationCache(args.cache_dir) if args.cache else None,
            model_id=model_id,
        )
    for t in turns:
        if args.json:
            print(json.dumps({"id": t.item_id, "turn": t.turn, "prompt": t.conversation[-1]["content"],
                              "reply": t.result.text, "tokens": t.result.tokens,
                              "hit_limit": t.result.hit_limit}, ensure_ascii=False))
        else:
            cut = " [hit --max-new-tokens]" if t.result.hit_limit else ""
            print(f"### {t.item_id} (turn {t.turn + 1}){cut}\n> {t.conversation[-1]['content']}\n\n{t.result.text}\n")
    return 0


def cmd_train_rm(args: argparse.Namespace) -> int:
    from rahf.evaluate.reward_model import train_reward_model
    from rahf.evaluate.stats import Estimate

    config = train_rm_config(args)
    metrics = train_reward_model(config)
    accuracy = Estimate.from_dict(metrics["validation_accuracy"])
    longer = Estimate.from_dict(metrics["longer_wins_accuracy"])
    print(
        f"reward model -> {config.out}: {metrics['n_train']} train / {metrics['n_validation']} validation pairs,"
        f" {metrics['steps']} steps, {metrics['train_seconds']:.0f} s\n"
        f"held-out accuracy {accuracy}; 'longer reply wins' {longer} (95% bootstrap CI)"
    )
    return 0
