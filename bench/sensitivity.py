"""Benchmark: how RAHF's alpha and target-layer band move validation preference accuracy.

One variant (Dual by default) on a small budget (the `rahf demo --quick` settings). The first
sweep point runs the whole pipeline; every other point gets its own run folder with the data
and step-1 stage folders of the first one hard-linked in (checkpoints left out). ``align`` finds
those stages done (their ``DONE.json`` manifests and upstream digests match) and reruns only
the fit and export: a point's config differs from the first only in ``patterns.alpha`` or
``patterns.target_layers``, which the earlier stages never read.

* alpha sweep at the default target layers (every other index over the middle third);
* band sweep at alpha 5: every other ``hidden_states`` index in the lower, middle or upper
  third of the depth (SmolLM2-135M: 30 blocks).

Metric: preference accuracy (mean-token log-likelihood, 95% bootstrap CI) on the validation
pairs of ``../shared/data`` (the split of bench/quality.py, per source and pooled), or of the
built-in data when the shared data are not here. Results are cached per point under
``bench/out/sensitivity/``.

    python bench/sensitivity.py [--variant dual|scit] [--alphas 0 1 2.5 5 10] [--bands lower middle upper] [--smoke] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

from benchlib import (
    DATA_DIR,
    LABELS,
    SOURCES,
    cache_lock,
    digest,
    machine,
    margin_delta,
    mixed_splits,
    score,
    write_pairs,
    write_section,
)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "sensitivity"
IMG = ROOT / "docs" / "img"
ALPHAS = [0.0, 1.0, 2.5, 5.0, 10.0]
BAND_NAMES = ("lower", "middle", "upper")
DEFAULT_ALPHA = 5.0  # the paper's, and rahf's default
METRICS = 3  # version of what a point's result file holds (3: accuracy, margin, per-pair margins)
# The stages every point shares with the first (pipeline.py's stage names).
SHARED_STAGES = {"dual": ("data", "step1_preferred", "step1_dispreferred"), "scit": ("data", "step1")}


@dataclass
class Budget:
    train_pairs: int = 64
    step1_steps: int = 8
    fit_steps: int = 8
    batch_size: int = 8
    eval_pairs: int = 25  # per source (pooled: 2x)


SMOKE = Budget(train_pairs=16, step1_steps=2, fit_steps=2, batch_size=4, eval_pairs=4)


@dataclass(frozen=True)
class Point:
    """One sweep point: a name for its folder and plot, its alpha and target layers (None:
    rahf's default band)."""

    name: str
    alpha: float
    layers: tuple[int, ...] | None
    sweep: str  # "alpha" or "band"


def band(name: str, num_layers: int) -> tuple[int, ...]:
    """Every other hidden_states index (1..N) in the lower, middle or upper third of the depth."""
    k = BAND_NAMES.index(name)
    lo, hi = k * num_layers // 3, (k + 1) * num_layers // 3
    return tuple(range(lo + 1, hi + 1, 2))


def points(alphas: Sequence[float], bands: Sequence[str], num_layers: int, scan: Path | None = None) -> list[Point]:
    """Default band at alpha 5 first (the full run every other point reuses), then the sweeps;
    with ``scan``, the band a ``rahf scan`` recommends is one more band point."""
    from rahf.config import scan_layers

    out = [Point("alpha-5", DEFAULT_ALPHA, None, "alpha")]
    out += [Point(f"alpha-{a:g}", a, None, "alpha") for a in alphas if a != DEFAULT_ALPHA]
    out += [Point(f"band-{b}", DEFAULT_ALPHA, band(b, num_layers), "band") for b in bands]
    if scan is not None:
        out.append(Point("band-scan", DEFAULT_ALPHA, tuple(scan_layers(str(scan))), "band"))
    return out


def prepare_data(data_dir: Path, budget: Budget, folder: Path) -> dict[str, Any]:
    """Training file and validation pairs per source: the shared data (quality.py's split) if
    present, else the built-in data split by prompt."""
    from rahf.data import load_preferences, split_pairs

    folder.mkdir(parents=True, exist_ok=True)
    if all((data_dir / name).is_file() for name, _ in SOURCES.values()):
        splits = mixed_splits(data_dir, train_pairs=budget.train_pairs, val_fraction=0.2)
        train, val = splits["train"], {s: splits[f"val:{s}"][: budget.eval_pairs] for s in SOURCES}
        origin = "../shared/data (alpacaeval + hh-harmless dev, split by prompt as in bench/quality.py)"
    else:
        pairs = load_preferences("builtin").pairs
        train, held = split_pairs(pairs, validation_fraction=0.2, seed=0)
        train, val = train[: budget.train_pairs], {"builtin": held[: 2 * budget.eval_pairs]}
        origin = "the built-in data (../shared/data not found)"
    write_pairs(folder / "train.jsonl", train)
    return {"train": folder / "train.jsonl", "val": val, "origin": origin, "n_train": len(train)}


def overrides(variant: str, budget: Budget, data: Path, run_dir: Path, point: Point) -> list[str]:
    """The demo's quick budget for ``variant``, our data and step counts, and the point's knobs."""
    from rahf.demo import demo_overrides

    sized = [f"{stage}.train.{key}" for stage, steps in (("step1", budget.step1_steps), ("fit", budget.fit_steps))
             for key in (f"max_steps={steps}", f"batch_size={budget.batch_size}")]
    layers = [f"patterns.target_layers=[{','.join(map(str, point.layers))}]"] if point.layers else []
    # Readiness off: every point shares one step 1, and its check is not what this sweep measures.
    return [*demo_overrides(variant, True), f"data={data}", "validation_fraction=0", f"max_pairs={budget.train_pairs}",
            f"run_dir={run_dir}", *sized, f"patterns.alpha={point.alpha}", *layers, "step1.readiness_pairs=0"]


def link_shared(first: Path, run_dir: Path, stages: Sequence[str]) -> None:
    """Hard-link the first run's finished shared stages into ``run_dir`` (no copies, no
    checkpoints). Files are only ever replaced atomically, never rewritten, so links are safe."""
    for stage in stages:
        if not (run_dir / stage).exists():
            shutil.copytree(first / stage, run_dir / stage, ignore=shutil.ignore_patterns("checkpoints"),
                            copy_function=os.link)


def run_sweep(args: argparse.Namespace, budget: Budget, out: Path) -> tuple[dict, dict, list[Point]]:
    """Train and score every point (cached); returns base accuracy, per-point results, points."""
    from rahf.config import check_against_model, load_config
    from rahf.io import atomic_write_json, read_marker
    from rahf.models import model_config
    from rahf.pipeline import align

    data = prepare_data(args.data_dir, budget, out / f"data-{digest(asdict(budget))}")
    num_layers = model_config("smollm2").num_hidden_layers
    sweep = points(args.alphas, args.bands, num_layers, args.scan)
    root = out / f"{args.variant}-{digest({'budget': asdict(budget), 'origin': data['origin']})}"
    windows: dict[str, int] = {}
    results: dict[str, dict] = {}
    for point in sweep:
        run_dir = root / point.name
        config = load_config(None, overrides(args.variant, budget, data["train"], run_dir, point))
        windows = {"max_prompt_tokens": config.max_prompt_tokens, "max_reply_tokens": config.reply_window}
        result_file = run_dir / f"result-{digest({**windows, 'metrics': METRICS})}.json"
        if result_file.exists():
            results[point.name] = json.loads(result_file.read_text())
            continue
        if point is not sweep[0]:
            link_shared(root / sweep[0].name, run_dir, SHARED_STAGES[args.variant])
        print(f"sensitivity: {point.name} (alpha {point.alpha:g}, layers {point.layers or 'default'})", flush=True)
        started = time.time()
        final = align(config)
        fit = (read_marker(run_dir / "fit" / "DONE.json") or {}).get("result", {})
        t = time.time()
        result = {"point": asdict(point), "layers": check_against_model(config, num_layers),
                  **score(str(final / "merged"), data["val"], windows), "fit_seconds": fit.get("seconds"), "align_seconds": round(t - started, 1),
                  "eval_seconds": round(time.time() - t, 1)}
        atomic_write_json(result_file, result)
        results[point.name] = result
    base_file = root / f"base-{digest({**windows, 'metrics': METRICS})}.json"
    if not base_file.exists():
        atomic_write_json(base_file, score("smollm2", data["val"], windows))
    step1 = [(read_marker(root / sweep[0].name / s / "DONE.json") or {}).get("result", {}).get("seconds", 0)
             for s in SHARED_STAGES[args.variant][1:]]
    results["_meta"] = {"origin": data["origin"], "n_train": data["n_train"], "windows": windows, "root": str(root),
                        "step1_seconds": sum(step1)}
    return json.loads(base_file.read_text()), results, sweep


def _errors(estimates: list[dict]) -> list[list[float]]:
    """(2, n) error-bar lengths of estimates with optional bootstrap bounds."""
    return [[e["value"] - (e["low"] if e["low"] is not None else e["value"]) for e in estimates],
            [(e["high"] if e["high"] is not None else e["value"]) - e["value"] for e in estimates]]


def plot(base: dict, results: dict, sweep: list[Point], folder: Path, variant: str) -> list[Path]:
    """sensitivity_alpha.png and sensitivity_layers.png: left, accuracy per source and pooled
    (95% bootstrap CIs, dotted: the base model); right, the margin change from base (paired CI)."""
    import io

    import numpy as np
    from matplotlib.figure import Figure

    from rahf.io import atomic_write_bytes

    keys = list(base["accuracy"])
    written = []
    for sweep_name, xlabel in (("alpha", "alpha (target = orig + alpha * pattern)"), ("band", "target-layer band")):
        chosen = [p for p in sweep if p.sweep == sweep_name or (sweep_name == "band" and p.name == "alpha-5")]
        chosen.sort(key=lambda p: p.alpha if sweep_name == "alpha" else results[p.name]["layers"][0])
        x = np.arange(len(chosen)) if sweep_name == "band" else np.array([p.alpha for p in chosen])
        fig = Figure(figsize=(11, 3.8))
        left, right = fig.subplots(1, 2)
        for k, key in enumerate(keys):  # left: accuracy per source and pooled, dotted: base
            est = [results[p.name]["accuracy"][key] for p in chosen]
            shift = (k - (len(keys) - 1) / 2) * (0.08 if sweep_name == "band" else 0.12)
            line = left.errorbar(x + shift, [e["value"] for e in est], yerr=_errors(est), marker="o", capsize=3,
                                 label=key, lw=2 if key == "pooled" else 1)
            left.axhline(base["accuracy"][key]["value"], color=line[0].get_color(), ls=":", lw=0.8)
        deltas = [margin_delta(results[p.name], base) for p in chosen]  # right: paired margin change
        right.errorbar(x, [d["value"] for d in deltas], yerr=_errors(deltas), marker="o", capsize=3, color="green")
        right.axhline(0, color="grey", ls=":", lw=0.8)
        for ax, ylabel in ((left, "validation preference accuracy"),
                           (right, f"{keys[-1]} margin - base margin (nats)")):
            if sweep_name == "band":
                ax.set_xticks(x, [f"{p.name.removeprefix('band-').replace('alpha-5', 'default')}\n"
                                  f"{results[p.name]['layers'][0]}-{results[p.name]['layers'][-1]}" for p in chosen])
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
        left.legend(fontsize=7)
        fig.suptitle(f"{LABELS[variant]}: dotted = base model", fontsize=9)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90)
        path = folder / f"sensitivity_{'layers' if sweep_name == 'band' else 'alpha'}.png"
        atomic_write_bytes(path, buffer.getvalue())
        written.append(path)
    return written


def _cell(e: dict, *, pct: bool = True) -> str:
    f = (lambda v: f"{v:.1%}") if pct else (lambda v: f"{v:+.3f}")
    return f"{f(e['value'])} [{f(e['low'])}, {f(e['high'])}]" if e.get("low") is not None else f(e["value"])


def reading(base: dict, results: dict, sweep: list[Point]) -> list[str]:
    """Statements that follow from the numbers alone."""
    key = list(base["accuracy"])[-1]  # pooled when there are several sources
    acc = {p.name: results[p.name]["accuracy"][key] for p in sweep}
    margin = {p.name: results[p.name]["margin"][key] for p in sweep}
    b_acc, b_margin = base["accuracy"][key]["value"], base["margin"][key]["value"]
    notes = []
    if "alpha-0" in acc:
        notes.append(f"Control, alpha 0 (fit the model to its own activations): {key} accuracy {acc['alpha-0']['value']:.1%}"
                     f" vs base {b_acc:.1%}, margin {margin['alpha-0']['value'] - b_margin:+.4f} vs base.")
    far = max(acc, key=lambda n: abs(acc[n]["value"] - b_acc))
    outside = [n for n, e in acc.items() if e["low"] is not None and not e["low"] <= b_acc <= e["high"]]
    notes.append(f"Largest {key} accuracy change from base: {far} ({(acc[far]['value'] - b_acc) * 100:+.1f} points, "
                 f"{round(abs(acc[far]['value'] - b_acc) * acc[far]['n'])} of {acc[far]['n']} pairs); points whose 95% CI "
                 f"excludes the base accuracy: {', '.join(outside) or 'none'}.")
    deltas = {p.name: margin_delta(results[p.name], base) for p in sweep}
    cleared = [n for n, d in deltas.items() if d["low"] is not None and d["low"] > 0]
    alphas = sorted((p.alpha, p.name) for p in sweep if p.sweep == "alpha")
    notes.append(f"{key} margin change from base by alpha: "
                 + ", ".join(f"{a:g}: {deltas[n]['value']:+.3f}" for a, n in alphas)
                 + f"; points whose paired CI of the margin change is above 0: {', '.join(cleared) or 'none'}.")
    positive = [deltas[n]["value"] for a, n in alphas if a > 0]
    if len(positive) > 1 and max(positive) - min(positive) < 0.01:
        notes.append("Every alpha > 0 lands within 0.01 nats of the others. Expected early in the fit: there h = A_o,"
                     " so h - T = -alpha * v, and the gradient of the (unsquared) L2 loss, like Adam's scale-free step,"
                     " is the same for every alpha > 0; alpha matters only once h nears the targets. A short fit"
                     " cannot rank alphas: sweep them at the full budget.")
    bands = sorted((results[p.name]["layers"][-1], p.name) for p in sweep if p.sweep == "band" or p.name == "alpha-5")
    notes.append("Fit time by top target layer (the fit LoRA and its backward pass span the blocks below it): "
                 + ", ".join(f"{n.removeprefix('band-').replace('alpha-5', 'default')} (top {t}) "
                             f"{results[n]['fit_seconds']:.0f} s" for t, n in bands)
                 + ". A higher band therefore also trains a larger adapter: its effect mixes layer position"
                   " with adapter size.")
    return notes


def section(args: argparse.Namespace, budget: Budget, base: dict, results: dict, sweep: list[Point], command: str,
            minutes: float) -> str:
    """The BENCHMARKS.md section: command, machine, budget, table, plots, reading."""
    meta = results["_meta"]
    keys = list(base["accuracy"])
    rows = [f"| sweep | alpha | target layers | accuracy {' | accuracy '.join(keys)} | margin | margin - base (paired CI) | fit s |",
            "|---|---|---|" + "---|" * (len(keys) + 3),
            f"| base model | - | - | {' | '.join(_cell(base['accuracy'][k]) for k in keys)}"
            f" | {base['margin'][keys[-1]]['value']:+.3f} | - | - |"]
    for point in sorted(sweep, key=lambda p: (p.sweep, p.alpha, p.name)):
        r = results[point.name]
        layers = ",".join(map(str, r["layers"])) + (" (default)" if point.layers is None else f" ({point.name[5:]})")
        rows.append(f"| {point.sweep} | {point.alpha:g} | {layers} | {' | '.join(_cell(r['accuracy'][k]) for k in keys)}"
                    f" | {r['margin'][keys[-1]]['value']:+.3f} | {_cell(margin_delta(r, base), pct=False)} | {r['fit_seconds']:.0f} |")
    compute = (meta["step1_seconds"] + sum((results[p.name]["fit_seconds"] or 0) + results[p.name]["eval_seconds"]
                                           for p in sweep)) / 60
    notes = "\n".join(f"- {n}" for n in reading(base, results, sweep))
    return f"""
## Sensitivity: {LABELS[args.variant]} alpha and target-layer band

```
{command}
```

Machine: {machine()}. Date: {date.today().isoformat()}. Compute: {compute:.0f} min (step 1 once, then
fit and scoring per point); this invocation {minutes:.0f} min (cached points are read, not rerun).

Budget (learning rates and windows of `rahf demo --quick`): {meta['n_train']} training pairs from {meta['origin']};
step 1 {budget.step1_steps} steps per side, fit {budget.fit_steps} steps per point, batch {budget.batch_size};
step 1 runs once ({meta['step1_seconds']:.0f} s) and every point reuses it. Metrics on {budget.eval_pairs}
validation pairs per source (first {meta['windows']['max_reply_tokens']} reply tokens): preference
accuracy (mean-token log-likelihood, 95% bootstrap CI) and the {keys[-1]} margin l(chosen) - l(rejected)
of mean-token log-likelihoods in nats, with its change from the base model (paired bootstrap
95% CI over the same pairs: the finer signal at this size). The band sweep runs at alpha {DEFAULT_ALPHA:g},
the alpha sweep at the default layers.

{chr(10).join(rows)}

![accuracy and margin vs alpha](docs/img/sensitivity_alpha.png)
![accuracy and margin vs layer band](docs/img/sensitivity_layers.png)

Reading (the statements follow from the numbers above):

{notes}
- With {budget.eval_pairs} pairs per source one pair is {1 / budget.eval_pairs:.0%} of a source's accuracy: read
  trends in the margin, and take a setting from this sweep only where its interval clears the base model.
"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    d = Budget()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variant", choices=("dual", "scit"), default="dual", help="RAHF variant swept")
    p.add_argument("--alphas", type=float, nargs="+", default=ALPHAS, help="alphas at the default layers")
    p.add_argument("--bands", nargs="+", choices=BAND_NAMES, default=list(BAND_NAMES),
                   help=f"thirds of the depth, at alpha {DEFAULT_ALPHA:g}")
    p.add_argument("--scan", type=Path, help="a `rahf scan` scan.json: its recommended band is one more band point")
    p.add_argument("--train-pairs", type=int, default=d.train_pairs, help="half per source")
    p.add_argument("--step1-steps", type=int, default=d.step1_steps, help="step-1 optimizer steps (once)")
    p.add_argument("--fit-steps", type=int, default=d.fit_steps, help="fit optimizer steps per point")
    p.add_argument("--eval-pairs", type=int, default=d.eval_pairs, help="validation pairs per source")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    p.add_argument("--out", type=Path, help="cache folder (default bench/out/sensitivity, or sensitivity-smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny budget, alphas 0 5, bands lower upper; prints only")
    p.add_argument("--no-write", action="store_true", help="print the section instead of writing BENCHMARKS.md")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
    if args.smoke:
        budget, args.alphas, args.bands = SMOKE, [0.0, 5.0], ["lower", "upper"]
    else:
        budget = Budget(train_pairs=args.train_pairs, step1_steps=args.step1_steps, fit_steps=args.fit_steps,
                        eval_pairs=args.eval_pairs)
    out = args.out or OUT.with_name("sensitivity-smoke" if args.smoke else "sensitivity")
    command = "python bench/sensitivity.py " + " ".join(sys.argv[1:] if argv is None else argv)
    started = time.time()
    with cache_lock(out):  # one run per cache folder
        base, results, sweep = run_sweep(args, budget, out)
    write = not (args.smoke or args.no_write)
    pngs = plot(base, results, sweep, IMG if write else out, args.variant)
    text = section(args, budget, base, results, sweep, command.strip(), (time.time() - started) / 60)
    print(text)
    print(f"plots: {', '.join(map(str, pngs))}; runs in {results['_meta']['root']}")
    if write:
        write_section("sensitivity", text)
        print("wrote the sensitivity section of BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
