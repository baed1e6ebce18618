"""Benchmark: `rahf scan` on the embedded model, its band vs the sensitivity sweep, and steering's effect.

Data: the validation split of ``../shared/data`` (alpacaeval-prefs and hh-harmless dev files, split
by prompt as bench/quality.py and bench/sensitivity.py do, interleaved by prompt). Skips cleanly
when the shared data are not there.

1. Scan (instruction contrast I+ vs I-, no training) on the first ``--scan-pairs / 2`` validation
   pairs of each source: wall and CPU time, per-layer curves (docs/img/scan.png), recommendation.
2. The recommended band next to bench/sensitivity.py's band sweep (read from its BENCHMARKS.md
   table): the scan's score (mean held-out cosine) of each swept band, ranked, beside the sweep's
   measured margin change.
3. Steering at the recommended layers: for each strength, the paired change of the per-pair
   margin l(chosen) - l(rejected) (mean-token log-likelihood, nats; the summed one too), steered
   minus base, with a bootstrap 95% CI, on ``--pairs`` validation pairs per source; and 4-gram
   repetition of greedy replies (64 new tokens) to ``--prompts`` validation prompts, vs base.

Results are cached under bench/out/scan/ per setting, so a rerun adds only what is missing.

    OMP_NUM_THREADS=1 python bench/scan.py [--strengths S[:N] ...] [--pairs 300] [--sweep-pairs 100] [--smoke] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path

from benchlib import BENCHMARKS, DATA_DIR, SOURCES, digest, machine, mixed_splits, write_section

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "scan"
IMG = ROOT / "docs" / "img" / "scan.png"
WINDOWS = {"max_prompt_tokens": 128, "max_reply_tokens": 64}  # bench/quality.py's and the demo's


def load_splits(data_dir: Path) -> dict[str, list]:
    return mixed_splits(data_dir, train_pairs=64, val_fraction=0.2)


def cached(path: Path, compute) -> dict:
    from rahf.io import atomic_write_json

    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    atomic_write_json(path, result)
    return result


def run_scan_step(splits: dict, n: int, out: Path) -> tuple[dict, dict]:
    """The scan on n validation pairs (half per source); returns (result, vectors as lists)."""
    import torch

    from rahf.models import load_model, load_tokenizer
    from rahf.steering.readers import InstructionContrast, Windows
    from rahf.steering.scan import ScanConfig, scan

    def compute() -> dict:
        pairs = [p for source in SOURCES for p in splits[f"val:{source}"][: n // 2]]
        wall, cpu = time.time(), time.process_time()
        model = load_model("smollm2", dtype="float32", device="cpu")
        tokenizer = load_tokenizer("smollm2")
        bf16 = ScanConfig().bf16("cpu")
        reader = InstructionContrast(model, tokenizer, windows=Windows(**WINDOWS, batch_size=8, bf16=bf16))
        result, vectors = scan(reader, pairs)
        result.update({"model": "smollm2", "seconds": round(time.time() - wall, 1),
                       "cpu_seconds": round(time.process_time() - cpu, 1), "bf16": bf16,
                       "threads": torch.get_num_threads()})
        result["vectors"] = {str(k): v.tolist() for k, v in vectors.items()}
        return result

    result = cached(out / f"scan-{n}.json", compute)
    vectors = {int(k): torch.tensor(v) for k, v in result["vectors"].items()}
    return result, vectors


def sweep_bands(path: Path = BENCHMARKS) -> list[dict]:
    """bench/sensitivity.py's band rows (and the default band at alpha 5) from BENCHMARKS.md."""
    text = path.read_text() if path.is_file() else ""
    if "<!-- sensitivity:start -->" not in text:
        return []
    section = text.split("<!-- sensitivity:start -->")[1].split("<!-- sensitivity:end -->")[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 8 or not (cells[0] == "band" or (cells[0] == "alpha" and cells[1] == "5")):
            continue
        match = re.match(r"([\d,]+) \((\w+)\)", cells[2])
        delta = re.match(r"([+-][\d.]+) \[([+-][\d.]+), ([+-][\d.]+)\]", cells[-2])
        if match and delta:
            rows.append({"name": match.group(2), "layers": [int(x) for x in match.group(1).split(",")],
                         "margin_delta": [float(delta.group(i)) for i in (1, 2, 3)]})
    return rows


def score_margins(model, tokenizer, pairs, bf16: bool) -> dict:
    import torch

    from rahf.evaluate.scoring import score_pairs

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        s = score_pairs(model, tokenizer, pairs, progress=False, batch_size=8, **WINDOWS)
    return {"mean": (s.chosen_mean - s.rejected_mean).tolist(), "sum": (s.chosen_sum - s.rejected_sum).tolist()}


def cached_margins(out: Path, key: str, source: str, strength: float, n: int, compute) -> dict:
    """Per-pair margins of the first n pairs, sliced from a cached larger run when there is one."""
    for path in sorted(out.glob(f"margins-{key}-{source}-*-{strength:g}.json")):
        if int(path.name.split("-")[3]) >= n:
            data = json.loads(path.read_text())
            return {k: v[:n] for k, v in data.items()}
    return cached(out / f"margins-{key}-{source}-{n}-{strength:g}.json", compute)


def steering_step(splits: dict, vectors: dict, layers: list[int], strengths: dict[float, int],
                  n_prompts: int, out: Path) -> dict:
    """Per strength and source: per-pair margins (``strengths``: strength -> pairs per source;
    the base model is scored on the most); per strength: replies to the prompts."""
    import torch

    from rahf.evaluate.generation import generate
    from rahf.models import load_model, load_tokenizer
    from rahf.steering import steering

    model = load_model("smollm2", dtype="float32", device="cpu").eval()
    tokenizer = load_tokenizer("smollm2")
    prompts = []
    for source in SOURCES:
        seen = {p.prompt_text(): p.prompt for p in splits[f"val:{source}"]}
        prompts += list(seen.values())[: n_prompts // 2]
    from rahf.steering.scan import ScanConfig

    bf16 = ScanConfig().bf16("cpu")  # bf16 autocast where native, as the scan; base and steered alike
    key = digest({"layers": layers, "windows": WINDOWS, "bf16": bf16})
    results: dict = {"margins": {}, "replies": {}}
    order = sorted(strengths, key=lambda k: -strengths[k])  # the most pairs (the suggested strength) first
    for strength, n_pairs in {0.0: max(strengths.values()), **{k: strengths[k] for k in order}}.items():
        with steering(model, vectors, strength=strength, layers=layers):
            for source in SOURCES:
                pairs = splits[f"val:{source}"][:n_pairs]
                results["margins"][(strength, source)] = cached_margins(
                    out, key, source, strength, n_pairs, lambda p=pairs: score_margins(model, tokenizer, p, bf16))
            name = f"replies-{key}-{n_prompts}-{strength:g}.json"
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                results["replies"][strength] = cached(out / name, lambda: {"texts": [
                    r.text for r in generate(model, tokenizer, prompts, max_new_tokens=64, batch_size=8, progress=False)]})
        print(f"scan bench: strength {strength:g} done", flush=True)
    results["prompts"] = [p[-1]["content"] for p in prompts]
    results["bf16"] = bf16
    return results


def summarise(results: dict, strengths: Sequence[float]) -> dict:
    import numpy as np

    from rahf.evaluate.behaviour import repetition_rate
    from rahf.evaluate.stats import bootstrap

    rep = {s: 100 * float(np.mean([repetition_rate(t) for t in results["replies"][s]["texts"]])) for s in [0.0, *strengths]}
    rows = {}
    for s in strengths:
        for source in SOURCES:
            base, steered = results["margins"][(0.0, source)], results["margins"][(s, source)]
            n = len(steered["mean"])
            rows[(s, source)] = {kind: bootstrap(np.asarray(steered[kind]) - np.asarray(base[kind][:n])).to_dict()
                                 for kind in ("mean", "sum")}
    return {"repetition": rep, "deltas": rows, "bf16": results.get("bf16")}


def section(scan_result: dict, bands: list[dict], summary: dict, strengths: dict[float, int], suggested: float,
            n_prompts: int, command: str, examples: list[str]) -> str:
    from rahf.steering.scan import summary as scan_summary

    rec, m = scan_result["recommended"], scan_result["metrics"]
    score = dict(zip(m["layers"], m["cv_cosine"], strict=True))
    band_rows, ranked = [], []
    for b in bands:
        value = sum(score[x] for x in b["layers"]) / len(b["layers"])
        ranked.append((value, b))
    ranked.sort(key=lambda t: -t[0])
    by_sweep = sorted(bands, key=lambda b: -b["margin_delta"][0])
    for value, b in ranked:
        d = b["margin_delta"]
        band_rows.append(f"| {b['name']} | {','.join(map(str, b['layers']))} | {value:.3f} |"
                         f" {by_sweep.index(b) + 1} | {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] |")
    best_scan = ranked[0][1]["name"] if ranked else "-"
    best_sweep = by_sweep[0]["name"] if by_sweep else "-"
    lo, hi = rec["band"]
    overlap = {b["name"]: sum(lo <= x <= hi for x in b["layers"]) for b in bands}
    rep = summary["repetition"]
    steer_rows = []
    for s in strengths:
        cells = []
        for source in SOURCES:
            e = summary["deltas"][(s, source)]
            cells += [f"{e['mean']['value']:+.4f} [{e['mean']['low']:+.4f}, {e['mean']['high']:+.4f}]",
                      f"{e['sum']['value']:+.3f} [{e['sum']['low']:+.3f}, {e['sum']['high']:+.3f}]"]
        steer_rows.append(f"| {s:g}{' (suggested)' if abs(s - suggested) < 1e-9 else ''} | {strengths[s]} |"
                          f" {' | '.join(cells)} | {rep[s]:.1f} |")
    at = suggested if suggested in strengths else next(iter(strengths))
    above = [src for src in SOURCES if summary["deltas"][(at, src)]["mean"]["low"] > 0]
    fluent = rep[at] <= rep[0.0] + 3
    verdict = (f"At the suggested strength {at:.3g}: the paired CI of the mean-token margin change is above zero on"
               f" {', '.join(above) if above else 'no source'}; 4-gram repetition {rep[at]:.1f}% vs base"
               f" {rep[0.0]:.1f}% ({'within' if fluent else 'more than'} base + 3 points). Target (CI > 0 on at least"
               f" one source and repetition <= base + 3): {'met' if above and fluent else 'NOT met'}.")
    meets = [f"{s:g} (CI > 0 on {', '.join(src for src in SOURCES if summary['deltas'][(s, src)]['mean']['low'] > 0)},"
             f" {strengths[s]} pairs per source)" for s in strengths
             if any(summary["deltas"][(s, src)]["mean"]["low"] > 0 for src in SOURCES) and rep[s] <= rep[0.0] + 3]
    verdict += f" Strengths of this sweep that meet it: {', '.join(meets) if meets else 'none'}."
    header = " | ".join(f"{s} margin change, mean-token | {s} summed" for s in SOURCES)
    return f"""
## Scan and steering (`rahf scan`, `rahf steer`) on the embedded model

```
{command}
```

Machine: {machine()}. Date: {date.today().isoformat()}. Data: the validation split of ../shared/data
(split by prompt as bench/quality.py and bench/sensitivity.py; first pairs of the prompt-interleaved list).

**Scan** (instruction contrast I+ vs I- on SmolLM2-135M-Instruct, no training; {scan_result['pairs']} pairs,
half per source, one reply per pair; windows {WINDOWS['max_prompt_tokens']}/{WINDOWS['max_reply_tokens']} tokens;
bf16 autocast {'on' if scan_result.get('bf16') else 'off'}; {scan_result.get('threads')} torch thread(s)):
**{scan_result['seconds']:.0f} s wall, {scan_result['cpu_seconds']:.0f} s CPU** (model load included). The machine
was shared with other jobs, so wall time is what this job got, not what 2 free cores give; the CPU time is
the cost. Target, under 2 minutes on 2 cores: {'met in CPU time' if scan_result['cpu_seconds'] < 120 else 'NOT met in CPU time'}
({scan_result['cpu_seconds']:.0f} CPU-seconds on {scan_result.get('threads')} thread(s));
{'also' if scan_result['seconds'] < 120 else 'not'} in this shared run's wall time.

```
{scan_summary(scan_result)}
```

![scan: per-layer curves](docs/img/scan.png)

**Recommended band vs the sensitivity sweep.** The scan recommends layers
{','.join(map(str, rec['target_layers']))} (band {rec['band'][0]}-{rec['band'][1]}), which is none of the swept bands
(layers of each swept band inside {lo}-{hi}: {', '.join(f'{k} {v}' for k, v in overlap.items())}). Scoring each swept band with the scan's
own statistic (mean held-out cosine over its layers) and ranking them beside the sweep's measured pooled margin
change (RAHF-Dual, alpha 5, 8+8 fit steps; from the sensitivity section):

| swept band | layers | scan score (mean cv-cos) | rank in the sweep | sweep: margin - base (paired CI) |
|---|---|---|---|---|
{chr(10).join(band_rows)}

Plainly: the recommended band itself was not swept, so the sweep cannot say whether it is the best or
second-best band (running bench/sensitivity.py with it is the missing check). Among the swept bands, the scan
ranks **{best_scan}** first and the sweep's best is **{best_sweep}**: {'they agree' if best_scan == best_sweep
else 'they disagree'}. The sweep's CIs overlap except for the upper band's, which alone clears zero; the scan
reads the base model's instruction contrast while the sweep fits Dual step-1 patterns, so agreement is not
guaranteed by construction.

**Steering at the recommended layers** ({','.join(map(str, rec['target_layers']))}; strength = multiples of the mean
difference vector as read, added at every position), on the first n validation pairs per source (paired
bootstrap 95% CIs of the change of l(chosen) - l(rejected), steered minus base, in nats) and greedy replies
(64 new tokens) to {n_prompts} validation prompts (half per source); scoring and generation with bf16 autocast
{'on' if summary.get('bf16') else 'off'} for base and steered alike:

| strength | n per source | {header} | 4-gram repetition % |
|---|---|{'---|' * (2 * len(SOURCES) + 1)}
| 0 (base) | {max(strengths.values())} | {' | '.join(['-'] * (2 * len(SOURCES)))} | {rep[0.0]:.1f} |
{chr(10).join(steer_rows)}

{verdict}

Replies to the first prompts (base, then the strengths above):

{chr(10).join(examples)}
"""


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    p.add_argument("--scan-pairs", type=int, default=64)
    p.add_argument("--pairs", type=int, default=300, help="validation pairs per source at the suggested strength")
    p.add_argument("--sweep-pairs", type=int, default=100, help="validation pairs per source at the other strengths")
    p.add_argument("--prompts", type=int, default=20, help="validation prompts (half per source) for repetition")
    p.add_argument("--strengths", nargs="*", metavar="S[:N]",
                   help="strengths besides the suggested one, each on N pairs per source (default N: --sweep-pairs;"
                        " default strengths: half and twice the suggestion)")
    p.add_argument("--smoke", action="store_true", help="8 scan pairs, 8 pairs, 4 prompts; prints only")
    p.add_argument("--no-write", action="store_true", help="print the section instead of writing BENCHMARKS.md")
    args = p.parse_args(argv)
    if not all((args.data_dir / name).is_file() for name, _ in SOURCES.values()):
        print(f"scan bench: skipped, {args.data_dir} does not hold {', '.join(n for n, _ in SOURCES.values())}")
        return 0
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
    if args.smoke:
        args.scan_pairs, args.pairs, args.sweep_pairs, args.prompts = 8, 8, 4, 4
    out = OUT.with_name("scan-smoke") if args.smoke else OUT
    command = "OMP_NUM_THREADS=1 python bench/scan.py " + " ".join(sys.argv[1:] if argv is None else argv)
    splits = load_splits(args.data_dir)
    scan_result, vectors = run_scan_step(splits, args.scan_pairs, out)
    rec = scan_result["recommended"]
    suggested = float(f"{rec['strength']['suggested']:.3g}")
    others = [f"{suggested / 2:.3g}", f"{suggested * 2:.3g}"] if args.strengths is None else args.strengths
    sized = {}
    for item in others:
        value, _, n = item.partition(":")
        sized[float(value)] = min(int(n) if n else args.sweep_pairs, args.pairs)
    strengths = {suggested: args.pairs, **{s: n for s, n in sized.items() if s != suggested}}
    strengths = dict(sorted(strengths.items()))
    results = steering_step(splits, vectors, rec["target_layers"], strengths, args.prompts, out)
    summary = summarise(results, list(strengths))
    examples = []
    for i in range(min(2, len(results["prompts"]))):
        examples.append(f"**{results['prompts'][i][:120]}**\n")
        for s in [0.0, *strengths]:
            text = " ".join(results["replies"][s]["texts"][i].split())
            examples.append(f"- {s:g}: {text[:240]}{'...' if len(text) > 240 else ''}")
        examples.append("")
    text = section(scan_result, sweep_bands(), summary, strengths, suggested, args.prompts, command.strip(), examples)
    print(text)
    write = not (args.smoke or args.no_write)
    if write:
        from rahf.steering.scan import plot

        plot(scan_result, IMG)
        write_section("scan", text)
        print(f"wrote the scan section of BENCHMARKS.md and {IMG}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
