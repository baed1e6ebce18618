"""How far each aligned model moved from the base model, read on held-out replies (#13).

For each run given, the mean over reply tokens of KL(base || aligned) of the next-token
distributions, and of the end-or-continue choice (what ``fit.stop_weight`` holds), teacher-forced
on the first ``--pairs`` chosen replies of each source's validation split of bench/quality.py
(windows 128 + 64, bf16 autocast). Why: the generation metrics come from 24 prompts per source and
mix "moved further" with "stops later"; these read every model on the same held-out replies.

    python bench/drift.py RUN_DIR [RUN_DIR ...] [--pairs 24] [--data SPLIT_DIR]

RUN_DIR is a ``rahf align`` run folder: its ``final/merged`` is read, else ``final/adapter`` on
the base model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from benchlib import ROOT, SOURCES

from rahf.data import load_preferences
from rahf.data.schema import PreferencePair
from rahf.hidden_states import logits_at, pad_batch, predicting_mask
from rahf.method.fit import next_token_kl, stop_kl

WINDOWS = (128, 64)  # bench/quality.py's Budget.windows


def chosen_batches(pairs: list[PreferencePair], tokenizer, batch_size: int = 8) -> list[dict]:
    """Padded batches of (prompt, chosen reply), the reply cut to the quality bench's window."""
    from rahf.data.render import encode

    encoded = [encode(tokenizer, pair.prompt, pair.chosen, max_prompt_tokens=WINDOWS[0], max_reply_tokens=WINDOWS[1])
               for pair in pairs]
    return [pad_batch(encoded[i : i + batch_size], tokenizer.pad_token_id) for i in range(0, len(encoded), batch_size)]


@torch.no_grad()
def drift(base, model, batches: list[dict], stop_ids: list[int]) -> dict[str, float]:
    """Mean over ``batches`` (each weighted by its reply tokens) of the next-token KL and the
    stop-decision KL of ``model`` from ``base``."""
    totals, tokens = {"next_token_kl": 0.0, "stop_kl": 0.0}, 0
    for batch in batches:
        keep = predicting_mask(batch["reply_start"], batch["reply_len"], batch["input_ids"].shape[1])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            before, after = logits_at(base, batch, keep), logits_at(model, batch, keep)
        n = int(keep.sum())
        totals["next_token_kl"] += next_token_kl(before, after).item() * n
        totals["stop_kl"] += stop_kl(before, after, stop_ids).item() * n
        tokens += n
    return {k: v / max(tokens, 1) for k, v in totals.items()}


def load_aligned(run: Path):
    from peft import PeftModel

    from rahf.models import load_model

    if (run / "final" / "merged").is_dir():
        return load_model(str(run / "final" / "merged"), device="cpu").eval()
    return PeftModel.from_pretrained(load_model("smollm2", device="cpu"), str(run / "final" / "adapter")).merge_and_unload().eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--pairs", type=int, default=24, help="validation pairs per source")
    parser.add_argument("--data", type=Path, help="the quality bench's split folder (default: the newest one)")
    args = parser.parse_args()
    splits = sorted((ROOT / "bench" / "out" / "quality-v2").glob("data-*"), key=lambda p: p.stat().st_mtime)
    data = args.data or (splits[-1] if splits else None)
    if data is None or not all((data / f"val_{s}.jsonl").is_file() for s in SOURCES):
        print("bench/drift.py: skipped: no quality-bench split here (run bench/quality.py first; it needs ../shared/data)")
        return 0
    from rahf.models import load_model, load_tokenizer, stop_token_ids

    torch.set_num_threads(1)
    tokenizer = load_tokenizer("smollm2")
    base = load_model("smollm2", device="cpu").eval()
    stop_ids = stop_token_ids(base, tokenizer)
    batches = {s: chosen_batches(load_preferences(str(data / f"val_{s}.jsonl"), limit=args.pairs).pairs, tokenizer)
               for s in SOURCES}
    print(f"| run | {' | '.join(f'next-token KL {s} | stop KL {s}' for s in SOURCES)} |")
    print("|---" * (1 + 2 * len(SOURCES)) + "|")
    for run in args.runs:
        model = load_aligned(run)
        cells = []
        for source in SOURCES:
            d = drift(base, model, batches[source], stop_ids)
            cells += [f"{d['next_token_kl']:.3f}", f"{d['stop_kl']:.4f}"]
        print(f"| {run.parent.name}/{run.name} | {' | '.join(cells)} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
