"""CLI: ``rahf eval``, ``rahf eval compare``, ``rahf generate``, ``rahf train-rm``.

Each command parses its flags into the same dataclass the Python API takes, runs it, and prints;
no logic lives only here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from rahf.config import ConfigError

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
    _add_eval_arguments(ev)
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
    gen.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a user prompt (repeatable)")
    gen.add_argument("--prompts", metavar="FILE", help="a prompt file")
    gen.add_argument("--limit", type=int, metavar="N", help="first N prompts of the file")
    _add_generation_arguments(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object per reply")
    gen.add_argument("--steer", metavar="FILE", help="add a steering vector file (rahf scan / compose, or a"
                     " llama.cpp control-vector .gguf) to the residual stream while generating")
    gen.add_argument("--strength", type=float, help="with --steer: multiples of the vector as read (default: the file's)")
    gen.add_argument("--layers", help="with --steer: hidden_states indices, e.g. 11,13,15 (default: the file's)")
    gen.set_defaults(func=cmd_generate)

    rm = subparsers.add_parser(
        "train-rm",
        help="train a reward model (TRL RewardTrainer) on preference pairs",
        description="Train a sequence-classification reward model on DATA, split train/validation"
        " by prompt, save it (LoRA merged) to --out with metrics.json: held-out accuracy and the"
        " 'longer reply wins' baseline.",
    )
    rm.add_argument("--data", required=True, help="preference data file, folder, hub id or 'builtin'")
    rm.add_argument("--model", default="smollm2", help="backbone (default: smollm2)")
    rm.add_argument("--out", required=True, metavar="DIR", help="folder for the reward model")
    method = rm.add_mutually_exclusive_group()
    method.add_argument("--lora", dest="method", action="store_const", const="lora",
                        help="LoRA on all linear layers + score head (default)")
    method.add_argument("--head-only", dest="method", action="store_const", const="head-only",
                        help="train only the score head on a frozen backbone (fast)")
    rm.set_defaults(method="lora")
    rm.add_argument("--lora-layers", type=int, metavar="N",
                    help="LoRA only in the top N blocks (default: all; fewer is faster on a CPU)")
    rm.add_argument("--val-fraction", type=float, default=0.1, help="share of prompts held out (default 0.1)")
    rm.add_argument("--epochs", type=float, default=1.0)
    rm.add_argument("--max-steps", type=int, default=-1, help="> 0 overrides --epochs")
    rm.add_argument("--lr", type=float, help="learning rate (default 2e-4 LoRA, 1e-3 head-only)")
    rm.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    rm.add_argument("--limit", type=int, metavar="N", help="use the first N valid pairs")
    rm.add_argument("--max-length", type=int, default=512, help="tokens per (prompt, reply) input")
    rm.add_argument("--max-reply-tokens", type=int, default=256)
    rm.add_argument("--format", default="auto", help="data format (default: detect)")
    rm.add_argument("--columns", metavar="KEY=COLUMN,...",
                    help="the data's column names, e.g. prompt=question,chosen=good,rejected=bad")
    rm.add_argument("--no-skip-invalid", dest="skip_invalid", action="store_false",
                    help="stop at the first invalid row instead of skipping it")
    rm.add_argument("--seed", type=int, default=0)
    rm.set_defaults(func=cmd_train_rm)


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


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="the model to evaluate (required unless `compare`)")
    parser.add_argument("--baseline", help="a model to compare against")
    parser.add_argument("--reference", help="reference model for DPO implicit-reward accuracy and margin")
    parser.add_argument("--pairs", action="append", default=[], metavar="FILE", help="preference data (repeatable)")
    parser.add_argument("--prompts", action="append", default=[], metavar="FILE", help="prompts to generate on (repeatable)")
    parser.add_argument("--harmful-prompts", action="append", default=[], metavar="FILE",
                        help="prompts that are all harmful requests (refusal rate; repeatable)")
    parser.add_argument("--reward-model", metavar="RM", help="sequence-classification reward model (folder or hub id)")
    parser.add_argument("--limit", type=int, metavar="N", help="first N valid pairs / prompts per file")
    parser.add_argument("--no-skip-invalid", dest="skip_invalid", action="store_false",
                        help="stop at the first invalid pair row (default: skip and count them)")
    parser.add_argument("--columns", metavar="KEY=COLUMN,...",
                        help="column names of the --pairs files, e.g. prompt=question,chosen=good,rejected=bad")
    parser.add_argument("--max-prompt-tokens", type=int, default=256, metavar="N")
    parser.add_argument("--max-reply-tokens", type=int, default=256, metavar="N", help="reply tokens scored per pair")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, no tables")
    parser.add_argument("--out", metavar="DIR", help="report folder (required unless `compare`)")
    parser.add_argument("--steer", metavar="FILE", help="steer the evaluated model (not --baseline) with this vector"
                        " file while scoring and generating: the inference-time steering baseline")
    parser.add_argument("--strength", type=float, help="with --steer: multiples of the vector (default: the file's)")
    parser.add_argument("--layers", help="with --steer: hidden_states indices, e.g. 11,13,15 (default: the file's)")
    _add_generation_arguments(parser)


def cmd_eval(args: argparse.Namespace) -> int:
    from rahf.evaluate.report import to_markdown, write_report
    from rahf.evaluate.run import EvalConfig, run_eval

    if not args.model or not args.out:
        raise ConfigError("rahf eval needs --model and --out (or: rahf eval compare DIR ...)")
    config = EvalConfig(
        model=args.model, out=args.out, baseline=args.baseline, reference=args.reference,
        pairs=args.pairs, prompts=args.prompts, harmful_prompts=args.harmful_prompts,
        reward_model=args.reward_model, limit=args.limit, skip_invalid=args.skip_invalid,
        columns=args.columns, max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
        top_p=args.top_p, instruction=args.instruction, batch_size=args.batch_size,
        max_prompt_tokens=args.max_prompt_tokens, max_reply_tokens=args.max_reply_tokens,
        seed=args.seed, resamples=args.resamples, cache=args.cache, cache_dir=args.cache_dir,
        steer=args.steer, steer_strength=args.strength, steer_layers=args.layers,
        device=args.device, dtype=args.dtype, progress=not args.quiet,
    )
    report = run_eval(config)
    paths = write_report(args.out, report, plots=args.plots)
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
    from rahf.evaluate.prompts import PromptItem, load_prompts

    items = [PromptItem(id=f"prompt-{i}", messages=({"role": "user", "content": text},))
             for i, text in enumerate(args.prompt)]
    if args.prompts:
        items += load_prompts(args.prompts, limit=args.limit).items
    if not items:
        raise DataError("nothing to generate: give --prompt TEXT and/or --prompts FILE")
    model, tokenizer, info = load_for_eval(args.model, device=args.device)
    steer, model_id = contextlib.nullcontext(), info.fingerprint
    if args.steer:
        from rahf.steering.steer import steering_from_file

        steer, model_id = steering_from_file(model, args.steer, strength=args.strength, layers=args.layers,
                                             model_id=model_id)
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
    from rahf.evaluate.reward_model import RewardModelConfig, train_reward_model
    from rahf.evaluate.stats import Estimate

    config = RewardModelConfig(
        data=args.data, out=args.out, model=args.model, method=args.method, data_format=args.format,
        columns=args.columns, skip_invalid=args.skip_invalid, limit=args.limit, validation_fraction=args.val_fraction,
        epochs=args.epochs, max_steps=args.max_steps, learning_rate=args.lr, lora_layers=args.lora_layers,
        batch_size=args.batch_size, max_length=args.max_length,
        max_reply_tokens=args.max_reply_tokens, seed=args.seed,
    )
    metrics = train_reward_model(config)
    accuracy = Estimate.from_dict(metrics["validation_accuracy"])
    longer = Estimate.from_dict(metrics["longer_wins_accuracy"])
    print(
        f"reward model -> {args.out}: {metrics['n_train']} train / {metrics['n_validation']} validation pairs,"
        f" {metrics['steps']} steps, {metrics['train_seconds']:.0f} s\n"
        f"held-out accuracy {accuracy}; 'longer reply wins' {longer} (95% bootstrap CI)"
    )
    return 0
