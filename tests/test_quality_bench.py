"""bench/quality.py v2's arithmetic: steps at matched compute, the guards, the tuning rule and
the win rates, against hand-computed values (no model, no ../shared data)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import benchlib  # noqa: E402
import quality  # noqa: E402

from rahf.config import load_config  # noqa: E402


def test_steps_from_two_calibration_runs_single_stage():
    budget = quality.Budget(cpu_seconds=900, calib_steps=4)
    short = {"stage_cpu": {"other": 7.0, "sft": 9.0, "final": 2.0}}
    long = {"stage_cpu": {"other": 7.0, "sft": 17.0, "final": 2.0}}
    # 2 CPU-s per step; fixed: other 7 + final 2 + sft's own 9 - 2 = 16; (900 - 16) / 2 = 442
    assert quality.derive_steps({"lr": 5e-4}, short, long, budget) == {"baseline": 442}


def test_steps_split_rahf_budget_by_share_after_fixed_costs():
    budget = quality.Budget(cpu_seconds=900, calib_steps=4)
    short = {"stage_cpu": {"other": 8.0, "step1_preferred": 10.0, "step1_dispreferred": 10.0, "readiness": 30.0, "fit": 12.0}}
    long = {"stage_cpu": {"other": 8.0, "step1_preferred": 18.0, "step1_dispreferred": 18.0, "readiness": 30.0, "fit": 20.0}}
    knobs = {**quality.DEFAULTS["dual"], "share": 0.6}
    # step 1: 2 + 2 CPU-s per step (both sides), fit 2; fixed 8 + 8 + 10 + 8 + readiness 30 = 64 -> 836 left
    assert quality.derive_steps(knobs, short, long, budget) == {"step1": 125, "fit": 167}
    # more of the budget to step 1
    assert quality.derive_steps({**knobs, "share": 0.8}, short, long, budget) == {"step1": 167, "fit": 83}


def _result(margins, rewards, lengths, **behaviour) -> dict:
    beh = {"mean_tokens": 50.0, "hit_limit_rate": 0.5, "repetition_rate": 0.05, "refusal_rate": 0.1, "over_refusal_rate": 0.0}
    source = {"pair_margins": margins, "rewards": rewards, "lengths": lengths, "accuracy": {"value": 0.5},
              "behaviour": {**beh, **behaviour}}
    return {"sources": dict.fromkeys(benchlib.SOURCES, source)}


def test_guards_name_each_broken_target():
    base = _result([0.0], [0.0], [10])
    assert all(benchlib.guards(_result([0.0], [0.0], [10], mean_tokens=55.0), base).values())
    broken = benchlib.guards(_result([0.0], [0.0], [10], mean_tokens=56.0, repetition_rate=0.09, over_refusal_rate=0.06), base)
    assert broken == {"length": False, "limit": True, "repetition": False, "over-refusal": False}


def test_pick_prefers_the_best_setting_that_keeps_the_guards():
    base = _result([0.0, 0.0], [0.0, 0.0], [10, 10])
    tried = {"long": _result([1.0, 1.0], [1.0, 1.0], [10, 10], mean_tokens=70.0),
             "safe": _result([0.2, 0.4], [1.0, 1.0], [10, 10]),
             "worse": _result([0.1, 0.1], [1.0, 1.0], [10, 10])}
    assert benchlib.pick_setting(tried, base) == "safe"
    assert benchlib.pick_setting({"long": tried["long"], "other": _result([0.5, 0.5], [0, 0], [10, 10], mean_tokens=70.0)}, base) == "long"
    assert benchlib.pick_setting({}, base) is None
    # none keeps every guard: the least excess wins over the larger margin
    repeats = _result([2.0, 2.0], [1.0, 1.0], [10, 10], repetition_rate=0.50)  # 42 points past, per source
    longer = _result([0.3, 0.3], [1.0, 1.0], [10, 10], mean_tokens=60.0)  # 10 points past, per source
    assert benchlib.pick_setting({"repeats": repeats, "longer": longer}, base) == "longer"


def test_guard_excess_counts_points_past_each_bound_over_both_sources():
    base = _result([0.0], [0.0], [10])
    result = _result([0.0], [0.0], [10], mean_tokens=60.0, hit_limit_rate=0.65, repetition_rate=0.05, over_refusal_rate=0.08)
    # per source: length 20 % - 10 = 10, limit 15 - 10 = 5, repetition 0, over-refusal 8 - 5 = 3
    assert benchlib.guard_excess(result, base) == pytest.approx({"length": 20.0, "limit": 10.0, "repetition": 0.0, "over-refusal": 6.0})
    assert benchlib.guard_excess(base, base) == dict.fromkeys(("length", "limit", "repetition", "over-refusal"), 0.0)


def test_paired_margin_and_win_rates():
    base = _result([0.1, 0.2, 0.3, 0.4], [0.0, 2.0, 4.0, 1.0], [10, 10, 10, 10])
    model = _result([0.2, 0.3, 0.4, 0.5], [1.0, 2.0, 3.0, 1.0 + 1e-9], [10, 10, 10, 10])
    vs = benchlib.versus_base(model, base)["hh"]
    assert vs["margin"]["value"] == pytest.approx(0.1) and vs["margin"]["low"] == pytest.approx(0.1)
    assert vs["win"]["value"] == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)  # win, tie, loss, tie (|diff| <= 1e-6)
    assert vs["lc"]["value"] == pytest.approx(0.5, abs=1e-6)  # equal lengths: LC = the raw win rate


def test_length_controlled_win_rate_discounts_wins_by_length():
    # A wins exactly when its reply is longer: raw 0.5 and, by symmetry, 0.5 at equal length
    rates = benchlib.win_rates([1, 1, 0, 0], [0, 0, 1, 1], [20, 20, 10, 10], [10, 10, 20, 20])
    assert rates["win"]["value"] == 0.5 and rates["lc"]["value"] == pytest.approx(0.5, abs=1e-6)
    # A always wins at equal length: LC near 1
    assert benchlib.win_rates([1] * 6, [0] * 6, [10] * 6, [10] * 6)["lc"]["value"] > 0.95


def test_report_renders_results_and_pending_cells(tmp_path, monkeypatch):
    import argparse

    import quality_report

    monkeypatch.setattr(quality_report, "PLOT", tmp_path / "quality.png")
    base = _result([0.0, 0.1], [0.0, 1.0], [10, 12])
    base["commit"], base["cpu_seconds"] = "a" * 40, 100.0
    trained = {"train": {"cpu_seconds": 880.0, "wall_seconds": 1200.0, "commit": "b" * 40, "stage_cpu": {"sft": 800.0},
                         "steps": {"baseline": 40}, "knobs": {"lr": 5e-4}}, "eval": {**_result([0.3, 0.4], [1.0, 2.0], [10, 12]), "cpu_seconds": 90.0, "commit": "b" * 40}}
    state = {"tune": {("sft", "lr5e-4"): trained, ("sft", "lr2e-4"): None}, "seeds": {("sft", 1): None}, "ablate": {},
             "free": {("prompt", "I+"): None}, "failed": [], "picks": {"sft": "lr5e-4"}, "best": None}
    args = argparse.Namespace(methods=["sft", "prompt"], seeds=[0, 1], smoke=False, no_write=False)
    ctx = {"base": base, "budget": quality.Budget(), "machine": "test machine"}
    text = quality_report.report(args, ctx, state, "python bench/quality.py", {"sft": {"lr5e-4": "why a", "lr2e-4": "why b"}})
    assert "| SFT (lr5e-4) | 1 | 50.0% | +0.300 [+0.300, +0.300] (1/1↑)" in text
    assert "| sft | lr2e-4 | why b | pending |" in text and "| prompting (I+ as system prompt) I+ | 0 | pending" in text
    # 40 steps x 8 examples x 192 tokens x 6 x 134.5M parameters
    assert f"880 / 20 min / {40 * 8 * 192 * 6 * 134.5e6:.1e}" in text
    assert (tmp_path / "quality.png").stat().st_size > 0


def test_ablation_table_starts_with_the_pick_and_shows_length_and_broken_guards(tmp_path, monkeypatch):
    import argparse

    import quality_report

    monkeypatch.setattr(quality_report, "PLOT", tmp_path / "quality.png")
    base = {**_result([0.0, 0.0], [0.0, 1.0], [10, 12]), "commit": "a" * 40, "cpu_seconds": 100.0}

    def trained(knobs: dict, margins: list[float], **behaviour) -> dict:
        return {"train": {"cpu_seconds": 600.0, "wall_seconds": 900.0, "commit": "b" * 40, "stage_cpu": {},
                          "steps": {"step1": 5, "fit": 20}, "knobs": knobs},
                "eval": {**_result(margins, [1.0, 2.0], [10, 12], **behaviour), "cpu_seconds": 90.0, "commit": "b" * 40}}

    state = {"tune": {("dual", "demo"): trained({"disjoint": 0.5}, [0.2, 0.4])}, "seeds": {},
             "ablate": {("ablate", "disjoint"): trained({"disjoint": 0.0}, [0.1, 0.1], mean_tokens=60.0),
                        ("ablate", "ready"): None},
             "free": {}, "failed": [], "picks": {"dual": "demo"}, "best": "dual"}
    args = argparse.Namespace(methods=["dual"], seeds=[0], smoke=False, no_write=False)
    ctx = {"base": base, "budget": quality.Budget(), "machine": "test machine"}
    text = quality_report.report(args, ctx, state, "python bench/quality.py", {"dual": {"demo": "why"}})
    table = text[text.index("| one change from the pick"):].splitlines()
    assert table[2].startswith("| none: the pick (demo), seed 0 | +0.300 [") and table[2].endswith("| +0% / +0% | ok |")
    # 60 mean tokens against the base's 50: +20 %, past the ±10 % length guard
    assert table[3].startswith("| disjoint → 0.0 | +0.100 [") and table[3].endswith("| +20% / +20% | broken: length |")
    assert table[4] == "| ready | pending | pending | | |"
    state["ablate"] = {("ablate", "stop", 10.0): None}  # an extra ablation's key carries its value
    text = quality_report.report(args, ctx, state, "python bench/quality.py", {"dual": {"demo": "why"}})
    assert "| stop 10.0 | pending | pending | | |" in text
    # An ablation confirmed on seeds 1 and 2: a main-table row of 3 runs, read against the targets too.
    args.seeds = [0, 1, 2]
    state |= {"ablate": {("ablate", "stop", 200.0): trained({"stop": 200.0}, [0.3, 0.5])}, "variants": [("stop", 200.0)],
              "confirm": {("stop", 200.0, 1): trained({"stop": 200.0}, [0.4, 0.6]), ("stop", 200.0, 2): None},
              "free": {("steer", "x1"): {**_result([0.1, 0.1], [1.0, 2.0], [10, 12]), "commit": "c" * 40, "cpu_seconds": 90.0}}}
    text = quality_report.report(args, ctx, state, "python bench/quality.py", {"dual": {"demo": "why"}})
    assert "| RAHF-Dual (demo + stop 200) | 2 | " in text  # seed 2 still pending: 2 runs
    assert "- alpacaeval: RAHF-Dual (demo + stop 200) margin − base +0.450, CI above 0 in 2 of 2 seeds" in text
    assert "- alpacaeval: RAHF-Dual (demo) margin − base +0.300" in text
    assert "- hh: RAHF-Dual (demo + stop 200) margin − base +0.450" in text  # the free baseline's name stays its own
    assert "Best free baseline here by margin: steer x1, margin − base +0.100" in text


def test_extra_ablations_set_their_options_and_keep_other_digests():
    knobs = {**quality.DEFAULTS["dual"], "objective": "preference"}
    args = (quality.Budget(), 0, Path("/data"), Path("/scan.json"), {"step1": 5, "fit": 20})
    assert "step1.shared_length=true" in quality.overrides("dual", {**knobs, "shared": True}, *args)
    assert "fit.stop_weight=10.0" in quality.overrides("dual", {**knobs, "stop": 10.0}, *args)
    assert "fit.kl_weight=10.0" in quality.overrides("dual", {**knobs, "kl": 10.0}, *args)
    normed = quality.overrides("dual", {**knobs, "norm": 5.0}, *args)
    assert {"step1.loss_type=sigmoid_norm", "step1.beta=5.0"} <= set(normed)
    assert load_config(None, [s for s in normed if not s.startswith("data=")]).step1.loss_type == "sigmoid_norm"
    rpo = load_config(None, [s for s in quality.overrides("dual", {**knobs, "rpo": 1.0}, *args) if not s.startswith("data=")])
    assert (rpo.step1.sft_weight, rpo.step1.loss_type) == (1.0, "sigmoid")
    plain = quality.overrides("dual", knobs, *args)
    assert not any("shared_length" in s or "stop_weight" in s or "kl_weight" in s or "loss_type" in s or "sft_weight" in s for s in plain)
    for knob, _, _ in quality.EXTRA_ABLATIONS:  # a new knob in DEFAULTS would change every cached setting's digest
        assert knob not in quality.DEFAULTS["dual"]


class _WordTokenizer:
    """One token per word, end-of-reply token 0: reply lengths a test can count."""

    chat_template = "{{ messages }}"
    eos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [1] * len(text.split())}


def test_stop_groups_and_the_margin_change_per_group():
    import quality_report

    # window 3: a reply of <= 2 words ends inside it (its end token fits), 3+ words are cut
    rows = [{"chosen": "a b c d", "rejected": "a b c"},  # both cut
            {"chosen": "a b c", "rejected": [{"role": "assistant", "content": "a"}]},  # only rejected ends
            {"chosen": "a b", "rejected": "a b c"},  # only chosen ends
            {"chosen": "a", "rejected": "a b"}]  # both end
    groups = quality_report.stop_groups(dict.fromkeys(benchlib.SOURCES, rows), _WordTokenizer(), window=3)
    assert groups["alpacaeval"] == {"both cut": [True, False, False, False], "only rejected ends": [False, True, False, False],
                                    "only chosen ends": [False, False, True, False], "both end": [False, False, False, True]}
    base = {"sources": dict.fromkeys(benchlib.SOURCES, {"pair_margins": [0.0, 0.0, 0.0, 0.0]})}
    runs = [{"sources": dict.fromkeys(benchlib.SOURCES, {"pair_margins": m})} for m in ([0.1, 1.0, -1.0, 0.2], [0.3, 0.0, -0.5, 0.2])]
    lines = quality_report.stop_table([("two runs", runs)], base, groups)
    assert lines[0].startswith("| run | alpacaeval: both cut (1) | alpacaeval: only rejected ends (1)")
    # run means per pair: +0.2, +0.5, -0.75, +0.2
    assert lines[2] == "| two runs | " + " | ".join(["+0.200", "+0.500", "-0.750", "+0.200"] * 2) + " |"


def test_ablations_wait_for_both_rahf_variants():
    assert quality.best_variant({"scit": 0.1, "dual": 0.3}) == "dual"
    assert quality.best_variant({"scit": 0.4, "dual": 0.3}) == "scit"
    assert quality.best_variant({"scit": 0.1}) is None  # a queue run with --methods scit alone
    assert quality.best_variant({}) is None
