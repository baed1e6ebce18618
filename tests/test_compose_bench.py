"""bench/compose.py: the source split of the quality pool, the reuse of the quality bench's
calibration, and the "does the composite keep the gain" reading, against hand-made values (no
model, no ../shared data: rahf is replaced by a recording fake)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import benchlib  # noqa: E402
import compose  # noqa: E402
import quality  # noqa: E402

BUDGET = quality.SMOKE  # 48 training pairs: 24 alpacaeval, then 24 hh


def test_split_takes_the_alpacaeval_half_then_the_hh_half(tmp_path):
    rows = [f'{{"row": {i}}}' for i in range(7)]
    parts = compose.split_by_source(rows, 7, tmp_path / "train.jsonl")
    assert parts == {"alpacaeval": rows[:3], "hh": rows[3:]}  # mixed_splits: train_pairs // 2 from alpacaeval
    with pytest.raises(ValueError, match=r"train\.jsonl: 6 rows, but the budget's train_pairs is 7"):
        compose.split_by_source(rows[:6], 7, tmp_path / "train.jsonl")


def test_verdict_reads_the_three_intervals():
    ci = lambda v, lo, hi: {"value": v, "low": lo, "high": hi}  # noqa: E731
    own = ci(0.4, 0.2, 0.6)
    assert compose.verdict(ci(0.1, -0.1, 0.3), own, ci(0.3, 0.1, 0.5)).startswith("no gain to keep")
    assert compose.verdict(own, ci(0.05, -0.02, 0.12), ci(-0.35, -0.5, -0.2)).startswith("lost")
    assert compose.verdict(own, ci(0.2, 0.05, 0.35), ci(-0.2, -0.3, -0.1)) == "partly kept (50% of it; the drop's CI is below 0)"
    assert compose.verdict(own, ci(0.38, 0.2, 0.55), ci(-0.02, -0.1, 0.06)).startswith("kept (")
    assert compose.verdict(own, ci(0.6, 0.4, 0.8), ci(0.2, 0.1, 0.3)) == "kept, and larger"


def _report_json(margins: list[float]) -> dict:
    """What ``rahf eval`` writes, as far as ``quality.evaluate`` reads it."""
    beh = {"mean_tokens": 50.0, "hit_limit_rate": 0.5, "repetition_rate": 0.05, "refusal_rate": 0.1, "over_refusal_rate": 0.0}
    acc = {"value": 0.5, "low": 0.25, "high": 0.75, "n": len(margins)}
    return {"preference": [{"source": f"/x/val_{s}.jsonl", "accuracy": acc, "pair_margins": margins} for s in benchlib.SOURCES],
            "generation": [{"source": f"/x/prompts_{s}.jsonl", "behaviour": beh, "rewards": [0.0, 1.0], "lengths_chars": [10, 12]}
                           for s in benchlib.SOURCES]}


def _name(argv: list[str]) -> str:
    return argv[1] if argv[0] == "--quiet" else argv[0]


class FakeRahf:
    """Records each CLI call; ``align`` reports CPU per stage, ``eval`` writes a report."""

    def __init__(self, margins: list[float]) -> None:
        self.calls: list[list[str]] = []
        self.margins = margins

    def __call__(self, argv: list[str], logfile: Path, run_dir: Path | None = None) -> dict:
        self.calls.append(argv)
        if _name(argv) == "eval":
            out = Path(argv[argv.index("--out") + 1])
            out.mkdir(parents=True)
            (out / "report.json").write_text(json.dumps(_report_json(self.margins)))
        steps = sum(int(a.split("=")[1]) for a in argv if a.startswith("step1.train.max_steps="))
        return {"cpu_seconds": 10.0, "wall_seconds": 20.0, "commit": "c" * 40,
                "stage_cpu": {"step1_preferred": 5.0 + steps, "step1_dispreferred": 5.0 + steps, "fit": 8.0 + steps}}


def _context(tmp_path: Path) -> dict:
    data = tmp_path / "quality" / "data-x"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text("".join(f'{{"row": {i}}}\n' for i in range(BUDGET.train_pairs)))
    root = data / "compose"
    return {"budget": BUDGET, "data": data, "root": root, "out": root, "rm": data / "rm", "scan": {"folder": data / "scan"},
            "sources": compose.write_sources(data, root, BUDGET)}


def test_single_run_reuses_the_quality_calibration_and_trains_on_its_half(tmp_path):
    ctx = _context(tmp_path)
    assert (ctx["root"] / "hh" / "train.jsonl").read_text().splitlines()[0] == '{"row": 24}'
    theirs = compose.run_folder(ctx["data"], BUDGET) / "calib.json"
    theirs.parent.mkdir(parents=True)
    theirs.write_text(json.dumps({"short": {}, "long": {}, "steps": {"step1": 7, "fit": 5}}))
    fake = FakeRahf([0.1, 0.2])
    result = compose.single(fake, ctx, "hh")
    assert [_name(c) for c in fake.calls] == ["align", "eval"]  # no calibration run: the quality bench's steps
    align = fake.calls[0]
    assert f"data={ctx['root'] / 'hh' / 'train.jsonl'}" in align and "step1.train.max_steps=7" in align and "fit.train.max_steps=5" in align
    assert result["train"]["steps"] == {"step1": 7, "fit": 5} and result["eval"]["sources"]["hh"]["pair_margins"] == [0.1, 0.2]
    mine = json.loads((compose.run_folder(ctx["sources"]["hh"], BUDGET) / "calib.json").read_text())
    assert mine["reused_from"] == str(theirs)
    fake.calls.clear()
    compose.single(fake, ctx, "hh")  # cached: a rerun runs nothing
    assert fake.calls == []


def test_single_run_calibrates_on_its_half_without_a_quality_calibration(tmp_path):
    ctx = _context(tmp_path)
    fake = FakeRahf([0.1, 0.2])
    compose.single(fake, ctx, "alpacaeval")
    assert [_name(c) for c in fake.calls] == ["align", "align", "align", "eval"]  # 1 and 1 + calib_steps steps, then training
    assert all(f"data={ctx['root'] / 'alpacaeval' / 'train.jsonl'}" in c for c in fake.calls[:3])
    assert "reused_from" not in json.loads((compose.run_folder(ctx["sources"]["alpacaeval"], BUDGET) / "calib.json").read_text())


def test_composite_merges_both_runs_and_the_report_reads_it(tmp_path):
    ctx = _context(tmp_path)
    quality_calib = compose.run_folder(ctx["data"], BUDGET) / "calib.json"
    quality_calib.parent.mkdir(parents=True)
    quality_calib.write_text(json.dumps({"steps": {"step1": 2, "fit": 2}}))
    state = {"single": {}, "composite": {}, "failed": []}
    for source, margins in (("alpacaeval", [0.4, 0.6]), ("hh", [0.5, 0.5])):
        state["single"][source] = compose.single(FakeRahf(margins), ctx, source)
    fake = FakeRahf([0.2, 0.3])
    state["composite"][(1.0, 1.0)] = compose.composite(fake, ctx, (1.0, 1.0))
    dirs = [str(compose.run_folder(ctx["sources"][s], BUDGET) / "seed0") for s in benchlib.SOURCES]
    assert fake.calls[0][:5] == ["compose", "--adapter", f"{dirs[0]}:1", "--adapter", f"{dirs[1]}:1"]
    assert fake.calls[0][-3:] == ["--out", str(compose.composite_folder(ctx["root"], (1.0, 1.0), dirs)), "--merged"]
    state["composite"][(0.5, 0.5)] = None
    base = {**quality.evaluate(FakeRahf([0.0, 0.0]), ctx, "smollm2", tmp_path / "base"), "commit": "b" * 40}
    ctx |= {"base": base, "machine": "test machine", "weights": ((1.0, 1.0), (0.5, 0.5))}
    args = argparse.Namespace(smoke=False, no_write=True)
    text = compose.report(args, ctx, state, "python bench/compose.py")
    assert "| RAHF-Dual on alpacaeval only | 50.0% [25.0%, 75.0%] | +0.500 [+0.400, +0.600] |" in text
    # alpacaeval: single +0.5, composite +0.25, composite - single -0.25 (both pairs): half of it, drop below 0
    assert "| 1:1 | alpacaeval | +0.500 [+0.400, +0.600] | +0.250 [+0.200, +0.300] | -0.250 [-0.300, -0.200] | partly kept (50% of it" in text
    assert "- **1:1:** of the 2 sources where the single run gained (CI above 0), the composite keeps the whole gain on 0 and part of it on 2." in text
    assert "(steps per stage from alpacaeval: the quality bench's calibration; hh: the quality bench's calibration)" in text
    assert "| composite 0.5 × alpacaeval + 0.5 × hh | pending |" in text and "| 0.5:0.5 | hh | pending |" in text
    # the read-only path finds the same cached results
    cached = compose.read_cached({**ctx})
    assert cached["composite"][(1.0, 1.0)]["eval"]["sources"]["hh"]["pair_margins"] == [0.2, 0.3]
    assert cached["composite"][(0.5, 0.5)] is None and cached["single"]["hh"]["train"]["steps"] == {"step1": 2, "fit": 2}


def test_reward_cache_is_copied_once_and_the_source_left_alone(tmp_path):
    theirs = tmp_path / "quality" / "generations" / "reward-accuracy"
    theirs.mkdir(parents=True)
    (theirs / "a.json").write_text('{"value": 0.6}')
    root = tmp_path / "compose"
    assert compose.seed_reward_cache(tmp_path / "quality", root) == 1
    assert (root / "generations" / "reward-accuracy" / "a.json").read_text() == '{"value": 0.6}'
    assert compose.seed_reward_cache(tmp_path / "quality", root) == 0  # already there
    assert sorted(p.name for p in theirs.iterdir()) == ["a.json"]
    assert compose.seed_reward_cache(tmp_path / "nothing", root) == 0
