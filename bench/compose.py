"""Composition benchmark (#12): does a composite of two single-source preference runs keep each
run's gain on its own source?

Two RAHF-Dual runs at bench/quality.py's ``dual`` ``demo`` setting and Budget (seed 0, the same
matched compute: the quality cache's calibration steps when it has them, else a calibration as
``quality.train`` does it): one on the alpacaeval half of the quality bench's training pool, one
on its hh half. ``rahf compose --adapter A:W --adapter H:W --merged`` combines them (PEFT's
``cat`` merge: delta W = w_a delta W_a + w_h delta W_h) at each weight pair in ``WEIGHTS``; each
single run and each composite is evaluated on both sources with ``quality.evaluate`` against the
quality cache's base evaluation. rahf is reached through its CLI from ``git archive`` of the
quality bench's pinned commit (or ``--commit``). Everything is cached
under ``<quality data>/compose/`` per job; a rerun computes only what is missing.

    python bench/compose.py [--jobs N] [--smoke] [--report-only] [--no-write] [--commit REV]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import date
from pathlib import Path
from typing import Any

import benchlib as bl
import quality as q
from benchlib import SOURCES, Runner, cached, digest, log
from quality_report import GUARDS

METHOD, SETTING = "dual", "demo"
WEIGHTS: tuple[tuple[float, float], ...] = ((1.0, 1.0), (0.5, 0.5))  # (alpacaeval run, hh run)
NEEDED = ("reward_model.json", "base/eval.json")  # what the quality bench must have computed first


def knobs() -> dict:
    """The quality bench's ``dual`` ``demo`` setting."""
    return {**q.DEFAULTS[METHOD], **q.SETTINGS[METHOD][SETTING][0]}


def run_folder(data: Path, budget: q.Budget) -> Path:
    """Where ``quality.train`` keeps the demo setting's runs for the training file ``data/train.jsonl``."""
    return data / "runs" / f"{METHOD}-{digest({'knobs': knobs(), 'budget': asdict(budget)})}"


def split_by_source(rows: list[str], train_pairs: int, path: Path) -> dict[str, list[str]]:
    """The quality pool's halves: ``benchlib.mixed_splits`` writes ``train_pairs // 2`` alpacaeval
    pairs, then the rest from hh, in ``SOURCES`` order. Any other row count means a source ran
    short and the boundary moved: refuse rather than mix sources."""
    if list(SOURCES) != ["alpacaeval", "hh"]:
        raise ValueError(f"bench/compose.py splits alpacaeval then hh; benchlib.SOURCES is {list(SOURCES)}")
    if len(rows) != train_pairs:
        raise ValueError(f"{path}: {len(rows)} rows, but the budget's train_pairs is {train_pairs}:"
                         " not the split benchlib.mixed_splits writes, so the source boundary is unknown")
    half = train_pairs // 2
    return {"alpacaeval": rows[:half], "hh": rows[half:]}


def write_sources(data: Path, root: Path, budget: q.Budget) -> dict[str, Path]:
    """``root/<source>/train.jsonl`` (once): each a folder ``quality.train`` can read as its data."""
    parts = split_by_source((data / "train.jsonl").read_text().splitlines(), budget.train_pairs, data / "train.jsonl")
    folders = {}
    for source, rows in parts.items():
        path = root / source / "train.jsonl"
        if not path.exists():
            # the snapshot's rahf, on sys.path once main() ran
            from rahf.io import atomic_write_text

            atomic_write_text(path, "".join(r + "\n" for r in rows))
        folders[source] = path.parent
    return folders


def composite_folder(root: Path, weights: tuple[float, float], run_dirs: list[str]) -> Path:
    """One folder per weight pair and pair of runs (a retrained run makes a new composite)."""
    return root / f"composite-{weights[0]:g}-{weights[1]:g}-{digest({'runs': run_dirs, 'weights': list(weights)})}"


def seed_reward_cache(quality_out: Path, root: Path) -> int:
    """Copy the quality bench's cached RM pair accuracies (``rahf eval`` keys them by RM and pairs,
    never by the evaluated model) into this bench's cache: they cost as much as a model's own
    scoring pass. The quality cache is only read. Returns how many were copied."""
    copied = 0
    for path in sorted((quality_out / "generations" / "reward-accuracy").glob("*.json")):
        target = root / "generations" / "reward-accuracy" / path.name
        if not target.exists():
            from rahf.io import atomic_write_bytes

            atomic_write_bytes(target, path.read_bytes())
            copied += 1
    return copied


# ------------------------------------------------------------------ jobs


def single(run: Runner, ctx: dict, source: str) -> dict:
    """Train on one source's half (matched compute), evaluate on both sources; cached."""
    budget, data = ctx["budget"], ctx["sources"][source]
    folder = run_folder(data, budget)
    theirs, mine = run_folder(ctx["data"], budget) / "calib.json", folder / "calib.json"
    if not mine.exists() and theirs.exists():  # the quality bench's steps: the same compute, not re-measured
        cached(mine, lambda: {**json.loads(theirs.read_text()), "reused_from": str(theirs)})
    trained = q.train(run, {**ctx, "data": data}, METHOD, knobs(), 0)
    log(f"{source}-only: evaluating")
    result = {"train": trained, "eval": q.evaluate(run, ctx, trained["model"], folder / "eval-seed0")}
    shutil.rmtree(trained["model"], ignore_errors=True)  # disk: the composites need only the adapters
    return result


def composite(run: Runner, ctx: dict, weights: tuple[float, float]) -> dict:
    """``rahf compose --merged`` of the single runs' adapters, then ``quality.evaluate``; cached."""
    run_dirs = [str(run_folder(ctx["sources"][s], ctx["budget"]) / "seed0") for s in SOURCES]  # quality.train's run_dir
    folder = composite_folder(ctx["root"], weights, run_dirs)
    if not (folder / "eval.json").exists() and not (folder / "merged").exists():
        (folder / "compose.json").unlink(missing_ok=True)  # merged model gone before its evaluation: rebuild

    def job() -> dict:
        for part in ("adapter", "merged"):
            shutil.rmtree(folder / part, ignore_errors=True)
        argv = ["compose", *[a for d, w in zip(run_dirs, weights, strict=True) for a in ("--adapter", f"{d}:{w:g}")],
                "--out", str(folder), "--merged"]
        return {**run(argv, folder / "compose.log"), "weights": list(weights), "runs": run_dirs, "model": str(folder / "merged")}

    composed = cached(folder / "compose.json", job)
    log(f"composite {weights[0]:g}:{weights[1]:g}: evaluating")
    result = {"compose": composed, "eval": q.evaluate(run, ctx, composed["model"], folder)}
    shutil.rmtree(composed["model"], ignore_errors=True)
    return result


def read_cached(ctx: dict) -> dict:
    """``--report-only``: what the cache holds (None: pending)."""
    state: dict[str, Any] = {"single": {}, "composite": {}, "failed": []}
    for source in SOURCES:
        folder = run_folder(ctx["sources"][source], ctx["budget"])
        paths = [folder / "train-seed0.json", folder / "eval-seed0" / "eval.json"]
        state["single"][source] = ({"train": json.loads(paths[0].read_text()), "eval": json.loads(paths[1].read_text())}
                                   if all(p.exists() for p in paths) else None)
    runs = state["single"]
    for weights in ctx["weights"]:
        folder = composite_folder(ctx["root"], weights, [str(run_folder(ctx["sources"][s], ctx["budget"]) / "seed0") for s in SOURCES])
        paths = [folder / "compose.json", folder / "eval.json"]
        state["composite"][weights] = ({"compose": json.loads(paths[0].read_text()), "eval": json.loads(paths[1].read_text())}
                                       if all(runs.values()) and all(p.exists() for p in paths) else None)
    return state


def run_all(args: argparse.Namespace, ctx: dict, run: Runner) -> dict:
    """Both single runs (in parallel with ``--jobs 2``), then every composite."""
    if args.report_only:
        return read_cached(ctx)
    state: dict[str, Any] = {"single": {}, "composite": {}, "failed": []}

    def guarded(label: str, fn: Any, *a: Any) -> Any:
        try:
            return fn(*a)
        except Exception as err:  # one failed job must not stop the others; a rerun retries it
            log(f"FAILED {label}: {err}")
            state["failed"].append(f"{label}: {str(err).splitlines()[0]}")
            return None

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {s: pool.submit(guarded, f"{s}-only", single, run, ctx, s) for s in SOURCES}
        state["single"] = {s: f.result() for s, f in futures.items()}
        runs = state["single"]
        futures = {w: pool.submit(guarded, f"composite {w[0]:g}:{w[1]:g}", composite, run, ctx, w)
                   for w in ctx["weights"] if all(runs.values())}
        state["composite"] = {w: futures[w].result() if w in futures else None for w in ctx["weights"]}
    return state


# ------------------------------------------------------------------ the report


def verdict(own: dict, mixed: dict, change: dict) -> str:
    """Does the composite keep a single run's gain on that run's own source? ``own``: the single
    run's margin − base, ``mixed``: the composite's, ``change``: composite − single (paired), each
    ``{value, low, high}`` (95% CI)."""
    if own["low"] <= 0:
        return "no gain to keep (the single run's CI is not above 0)"
    if mixed["low"] <= 0:
        return "lost (the composite's CI is not above 0)"
    if change["low"] > 0:
        return "kept, and larger"
    if change["high"] < 0:
        return f"partly kept ({mixed['value'] / own['value']:.0%} of it; the drop's CI is below 0)"
    return "kept (the change from the single run has a CI across 0)"


def _ci(c: dict, fmt: str = "+.3f") -> str:
    return f"{c['value']:{fmt}} [{c['low']:{fmt}}, {c['high']:{fmt}}]"


def model_row(label: str, result: dict | None, base: dict, cost: str) -> str:
    """One model: per source accuracy [CI], margin − base [paired CI], behaviour vs base; guards; cost."""
    if not result:
        return f"| {label} | " + " | ".join(["pending"] * (3 * len(SOURCES) + 1)) + " | |"
    is_base = result is base
    summ, cells = bl.summary([result], base), []
    for s, m in summ.items():
        refusal = f"ref {m['refusal_rate']:.0%}" if SOURCES[s][1] else f"over {m['over_refusal_rate']:.0%}"
        tokens = f"{m['mean_tokens']:.0f} tok" if is_base else f"tok {m['tokens']:+.0%}"
        cells += [_ci(result["sources"][s]["accuracy"], ".1%"), "—" if is_base else _ci(m["cis"][0]),
                  f"{tokens} · lim {m['hit_limit_rate']:.0%} · rep {m['repetition_rate']:.0%} · {refusal}"]
    g = bl.guards(result, base)
    guards = "—" if is_base else "ok" if all(g.values()) else "broken: " + ", ".join(k for k, ok in g.items() if not ok)
    return f"| {label} | " + " | ".join(cells) + f" | {guards} | {cost} |"


def keeps(state: dict, base: dict) -> tuple[list[str], list[str]]:
    """The table "does each composite keep each single run's gain on its own source" and its reading."""
    import numpy as np

    table = ["| composite | source | single run: margin − base | composite: margin − base | composite − single (paired) | reading |",
             "|---" * 6 + "|"]
    summary, notes = [], []
    for w, result in state["composite"].items():
        said_here = {}
        for s in SOURCES:
            mine = state["single"].get(s)
            if not (result and mine):
                table.append(f"| {w[0]:g}:{w[1]:g} | {s} | pending | pending | pending | |")
                continue
            own, mixed = bl.versus_base(mine["eval"], base)[s]["margin"], bl.versus_base(result["eval"], base)[s]["margin"]
            change = bl.interval(np.asarray(result["eval"]["sources"][s]["pair_margins"]) - np.asarray(mine["eval"]["sources"][s]["pair_margins"]))
            said = said_here[s] = verdict(own, mixed, change)
            table.append(f"| {w[0]:g}:{w[1]:g} | {s} | {_ci(own)} | {_ci(mixed)} | {_ci(change)} | {said} |")
            notes.append(f"- {w[0]:g}:{w[1]:g} on {s}: the {s}-only run moved the margin {own['value']:+.3f}, the composite"
                         f" {mixed['value']:+.3f} (composite − single {change['value']:+.3f}): {said}.")
        gains = [s for s, v in said_here.items() if not v.startswith("no gain")]
        if len(said_here) == len(SOURCES) and not gains:
            summary.append(f"- **{w[0]:g}:{w[1]:g}:** neither single run moved its own source's margin with a CI above 0: no gain to keep.")
        elif len(said_here) == len(SOURCES):
            count = {k: sum(said_here[s].startswith(k) for s in gains) for k in ("kept", "partly")}
            summary.append(f"- **{w[0]:g}:{w[1]:g}:** of the {len(gains)} sources where the single run gained (CI above 0), the composite"
                           f" keeps the whole gain on {count['kept']} and part of it on {count['partly']}.")
    notes = summary + notes
    for s in SOURCES:  # what each single run does to the other source: the interference a composite inherits
        other = next(o for o in SOURCES if o != s)
        if state["single"].get(s):
            cross = bl.versus_base(state["single"][s]["eval"], base)[other]["margin"]
            notes.append(f"- the {s}-only run on {other} (not its training source): margin − base {_ci(cross)}.")
    return table, notes or ["- pending."]


def report(args: argparse.Namespace, ctx: dict, state: dict, command_line: str) -> str:
    """The BENCHMARKS.md ``compose`` section."""
    base, budget = ctx["base"], ctx["budget"]
    head = " | ".join(f"pref. acc. {s} [95% CI] | margin − base {s} (nats) [paired CI] | behaviour {s} vs base" for s in SOURCES)
    lines = [f"| model | {head} | guards | cost |", "|---" * (3 + 3 * len(SOURCES)) + "|"]
    for s in SOURCES:
        r = state["single"].get(s)
        steps = ", ".join(f"{k} {v}" for k, v in r["train"]["steps"].items()) if r else ""
        cost = f"train {r['train']['cpu_seconds']:.0f} CPU-s, steps {steps}" if r else ""
        lines.append(model_row(f"RAHF-Dual on {s} only", r["eval"] if r else None, base, cost))
    for w, r in state["composite"].items():
        cost = f"compose {r['compose']['cpu_seconds']:.0f} CPU-s" if r else ""
        lines.append(model_row(f"composite {w[0]:g} × alpacaeval + {w[1]:g} × hh", r["eval"] if r else None, base, cost))
    lines.append(model_row("base (no training)", base, base, "—"))
    table, notes = keeps(state, base)
    done = [r for part in ("single", "composite") for r in state[part].values() if r]
    evals = [r["eval"] for r in done] + [base]
    eval_cpu = bl.mean_spread([e["cpu_seconds"] for e in evals])[0]
    n_evals = len(SOURCES) + len(ctx["weights"])
    calibs = {s: run_folder(ctx["sources"][s], budget) / "calib.json" for s in SOURCES}
    origin = "; ".join(f"{s}: " + ("pending" if not c.exists() else "the quality bench's calibration" if "reused_from" in json.loads(
        c.read_text()) else "its own calibration") for s, c in calibs.items())
    commits = sorted({j["commit"][:7] for j in [*evals, *[r["train"] for r in state["single"].values() if r]]})
    failed = "".join(f"\n- failed (a rerun retries it): {f}" for f in state["failed"])
    return f"""
## Composition: two single-source RAHF-Dual runs and their merged adapters (#12)

```
{command_line}
```

Machine: {ctx['machine']}; 1 thread per job. Date: {date.today().isoformat()}. rahf commits (run from `git archive`):
{', '.join(commits)}. Model SmolLM2-135M-Instruct.
Two RAHF-Dual runs at bench/quality.py's `demo` setting, seed 0, {budget.cpu_seconds:.0f} training CPU-seconds each
(steps per stage from {origin}): one on the
{budget.train_pairs // 2} alpacaeval pairs of the quality bench's training pool, one on its {budget.train_pairs - budget.train_pairs // 2}
hh pairs. `rahf compose --adapter ALPACA_RUN:W --adapter HH_RUN:W --merged` adds their LoRA weight changes
(PEFT `cat`: delta W = W * delta W_alpacaeval + W * delta W_hh). Every model is scored on both sources' validation split
({budget.eval_pairs} pairs and {budget.eval_prompts} prompts per source, {budget.eval_dtype}) against the quality
bench's base evaluation. Accuracy: 95% CI over pairs; margin − base: mean-token l(y+) − l(y−) change from the base,
paired over the same pairs; behaviour: reply tokens vs base, limit-hit, 4-gram repetition, refusal (hh) /
over-refusal (alpacaeval); guards (both sources): {GUARDS}.
Cost: 2 x {budget.cpu_seconds:.0f} training CPU-s + {n_evals} evaluations x {eval_cpu:.0f} CPU-s (mean here) =
{(2 * budget.cpu_seconds + n_evals * eval_cpu) / 3600:.2f} CPU-hours, plus the merges (column) and, when the quality
bench had none yet, the calibration.

{chr(10).join(lines)}

Does the composite keep each single run's gain on its own source?

{chr(10).join(table)}

Reading:

{chr(10).join(notes)}{failed}
"""


# ------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=1, help="jobs in parallel (1 thread each)")
    p.add_argument("--commit", help="run rahf from this commit (default: bench/quality.py's pin, else HEAD)")
    p.add_argument("--cpu-seconds", type=float, help="training CPU-seconds per run (default: quality's Budget)")
    p.add_argument("--data-dir", type=Path, default=bl.DATA_DIR)
    p.add_argument("--quality-out", type=Path, help="the quality bench's cache (default quality-v2, or quality-v2-smoke)")
    p.add_argument("--out", type=Path, help="this bench's cache (default: <quality data folder>/compose)")
    p.add_argument("--smoke", action="store_true", help="tiny budget end to end, weights 1:1 only; writes no BENCHMARKS.md")
    p.add_argument("--report-only", action="store_true", help="write the section from the cache (missing cells: pending)")
    p.add_argument("--no-write", action="store_true", help="print the section instead of writing BENCHMARKS.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not all((args.data_dir / name).is_file() for name, _ in SOURCES.values()):
        print(f"bench/compose.py: skipped: {args.data_dir} not found (the shared data is not here)")
        return 0
    budget = q.budget_for(args)
    quality_out = args.quality_out or q.OUT.with_name("quality-v2-smoke" if args.smoke else "quality-v2")
    data = q.data_split(args.data_dir, quality_out, budget)  # the quality bench's: read, not written
    missing = [f for f in NEEDED if not (data / f).exists()]
    if missing:
        print(f"bench/compose.py: {data} has no {', '.join(missing)} yet: run bench/quality.py{' --smoke' if args.smoke else ''} first"
              " (its reward model and base evaluation are this bench's too)")
        return 0 if args.report_only else 1
    root = (args.out or data / "compose").resolve()
    pin = q.OUT / "commit.json"  # the full quality bench's pin, smoke too: the code the full run uses
    rev = args.commit or (json.loads(pin.read_text())["commit"] if pin.exists() else None)
    commit, src = bl.snapshot(root, rev)  # root/commit.json records it
    sys.path.insert(0, str(src))  # the orchestrator's own rahf imports (lock, atomic writes) too
    from benchlib import machine

    run = Runner(commit, src)
    line = "python bench/compose.py " + " ".join(sys.argv[1:] if argv is None else argv)
    log(f"commit {commit[:12]} from {src}; budget {asdict(budget)}; cache {root}")
    with contextlib.nullcontext() if args.report_only else bl.cache_lock(root):
        ctx = {"budget": budget, "data": data, "root": root, "out": root, "machine": machine(),
               "weights": WEIGHTS[:1] if args.smoke else WEIGHTS, "scan": {"folder": data / "scan"},
               "sources": write_sources(data, root, budget), "rm": q.reward_model(run, data, budget),  # cached: no job
               "base": json.loads((data / "base" / "eval.json").read_text())}
        if not args.report_only:
            log(f"{seed_reward_cache(quality_out, root)} cached RM pair accuracies copied from {quality_out}")
        state = run_all(args, ctx, run)
    if args.report_only and not any(r for part in ("single", "composite") for r in state[part].values()):
        print("bench/compose.py: no composition result yet; BENCHMARKS.md unchanged")
        return 0
    text = report(args, ctx, state, line.strip())
    print(text)
    if not (args.smoke or args.no_write):
        bl.write_section("compose", text)
        print(f"wrote the compose section of {bl.BENCHMARKS}")
    return 1 if state["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
