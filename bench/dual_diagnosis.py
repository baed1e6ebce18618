"""Diagnosis of the quality bench's RAHF-Dual runs: did step 1 learn a preference to transfer?

Dual's signal is the difference between the preferred model M+ (SFT on chosen replies) and the
dispreferred model M- (SFT on rejected replies). If M+ does not prefer the chosen reply more
than M- does, on held-out pairs, the fitted direction carries little preference whatever step 3
does. For each Dual run of ``bench/quality.py`` (its cache) this scores M+, M- and the final
model on the bench's validation pairs and prints the paired margin change from the base model
per source (mean-token log-likelihoods, nats, 95% paired bootstrap CI), plus M+ minus M-.

    python bench/dual_diagnosis.py [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchlib import SOURCES, V1_OUT, V1_WINDOWS, digest, score, source_margin_deltas

from rahf.data import load_preferences


def _cell(estimate: dict) -> str:
    return f"{estimate['value']:+.3f} [{estimate['low']:+.3f}, {estimate['high']:+.3f}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=V1_OUT, help="the quality bench's (v1) cache folder")
    parser.add_argument("--run", type=Path, action="append", default=[],
                        help="a Dual run folder of the bench (e.g. one made with --set); replaces --seeds")
    args = parser.parse_args(argv)
    manifests = sorted(args.out.glob("data-*/manifest.json"), key=lambda m: m.stat().st_mtime)
    data = manifests[-1] if manifests else None  # the latest bench settings
    if data is None:
        print(f"dual_diagnosis: skipped: no quality bench results under {args.out} (run bench/quality.py first)")
        return 0
    data = data.parent
    budget = json.loads((data / "manifest.json").read_text())
    windows = dict(V1_WINDOWS)
    base = json.loads((data / "base" / f"scores-{digest(windows)}.json").read_text())
    val = {s: load_preferences(str(data / f"val_{s}.jsonl")).pairs for s in SOURCES}
    print(f"data {data.name}: {budget['counts']}")
    print("| seed | model | " + " | ".join(f"margin - base {s} (paired 95% CI)" for s in SOURCES) + " |")
    print("|---|---|" + "---|" * len(SOURCES))
    # The bench's own runs: the default settings' digest is in bench/quality.py's run names; with
    # several Dual runs per seed (--set variants), name the one you mean with --run.
    runs = [(run.name, run / "final") for run in args.run] or [
        (str(seed), next(iter(sorted(data.glob(f"runs/dual-seed{seed}-*/final"))), None)) for seed in args.seeds]
    for seed, run in runs:
        models = {"M+ (step1_preferred)": run.parent / "step1_preferred" / "adapter",
                  "M- (step1_dispreferred)": run.parent / "step1_dispreferred" / "adapter",
                  "RAHF-Dual (final)": run / "merged"} if run is not None else {}
        models = {name: path for name, path in models.items() if path.exists()}  # final: once fitted
        if len(models) < 2:
            print(f"| {seed} | no Dual step-1 models yet | " + " | ".join("-" for _ in SOURCES) + " |")
            continue
        scored = {name: score(str(path), val, windows) for name, path in models.items()}
        for name, result in scored.items():
            deltas = source_margin_deltas(result, base)
            print(f"| {seed} | {name} | " + " | ".join(_cell(deltas[s]) for s in SOURCES) + " |")
        contrast = source_margin_deltas(scored["M+ (step1_preferred)"], scored["M- (step1_dispreferred)"])
        print(f"| {seed} | M+ minus M- | " + " | ".join(_cell(contrast[s]) for s in SOURCES) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
