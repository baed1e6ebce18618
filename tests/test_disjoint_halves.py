"""Prompt-disjoint halves: step 1 trains on one, the patterns and the fit read the other."""

from __future__ import annotations

import json
import math

import pytest
from shared_runs import aligned_run_fixture, tiny_assets_fixture, tiny_settings  # noqa: F401  (fixtures)

from rahf.data.schema import DataError, PreferencePair
from rahf.data.split import disjoint_halves, split_counts, split_pairs


def pairs(n: int, repeats: int = 1) -> list[PreferencePair]:
    return [
        PreferencePair(({"role": "user", "content": f"question {i}"},), f"good {i} {r}", f"bad {i} {r}", f"f:{i}")
        for i in range(n) for r in range(repeats)
    ]


def test_halves_are_prompt_disjoint_and_cover_every_pair():
    data = pairs(300, repeats=2)  # two pairs per prompt
    step1, patterns = disjoint_halves(data, share=0.5, seed=3)
    assert {p.prompt_text() for p in step1}.isdisjoint(p.prompt_text() for p in patterns)
    assert sorted(step1 + patterns, key=data.index) == data
    assert step1 == [p for p in data if p in step1] and patterns == [p for p in data if p in patterns]  # input order
    assert 0.4 < len(patterns) / len(data) < 0.6


def test_halves_are_deterministic_and_follow_the_share():
    data = pairs(2000)
    assert disjoint_halves(data, share=0.3, seed=0) == disjoint_halves(list(data), share=0.3, seed=0)
    _, patterns = disjoint_halves(data, share=0.3, seed=0)
    assert 0.27 < len(patterns) / len(data) < 0.33
    assert disjoint_halves(data, share=0.3, seed=1) != disjoint_halves(data, share=0.3, seed=0)


def test_halves_cut_independently_of_the_validation_split():
    """Another salt: among validation prompts, the patterns share is the share, not 0 or 1."""
    data = pairs(2000)
    _, validation = split_pairs(data, validation_fraction=0.5, seed=0)
    _, patterns_of_validation = disjoint_halves(validation, share=0.5, seed=0)
    assert 0.4 < len(patterns_of_validation) / len(validation) < 0.6


def test_share_zero_feeds_every_pair_to_both_steps():
    data = pairs(50)
    assert disjoint_halves(data, share=0, seed=0) == (data, data)


@pytest.mark.parametrize("share", [-0.1, 1.0])
def test_share_out_of_range_is_refused(share):
    with pytest.raises(DataError, match="disjoint_share"):
        disjoint_halves(pairs(4), share=share)


def test_data_stage_writes_the_halves_and_share_zero_keeps_the_old_files(tiny_assets, tmp_path):
    from rahf.config import load_config
    from rahf.runs import prepare_data, read_pairs

    model, data = tiny_assets
    folders = {}
    for share in (0.5, 0.0):
        folder = folders[share] = tmp_path / str(share)
        folder.mkdir()
        stats = prepare_data(load_config(None, tiny_settings(model, data, tmp_path / "run",
                                                             f"patterns.disjoint_share={share}")), folder)
    assert sorted(p.name for p in folders[0.0].iterdir()) == ["train.jsonl", "validation.jsonl"]
    assert sorted(p.name for p in folders[0.5].iterdir()) == ["patterns.jsonl", "step1.jsonl", "train.jsonl", "validation.jsonl"]
    for name in ("train.jsonl", "validation.jsonl"):  # the same split either way
        assert (folders[0.5] / name).read_bytes() == (folders[0.0] / name).read_bytes()
    train = read_pairs(folders[0.5] / "train.jsonl")
    step1, patterns = read_pairs(folders[0.5] / "step1.jsonl"), read_pairs(folders[0.5] / "patterns.jsonl")
    assert sorted(step1 + patterns, key=train.index) == train and step1 and patterns
    assert {p.prompt_text() for p in step1}.isdisjoint(p.prompt_text() for p in patterns)
    assert "step1" not in stats  # share 0: no halves reported


def test_a_share_that_empties_a_half_is_refused(tiny_assets, tmp_path):
    from rahf.config import load_config
    from rahf.runs import prepare_data

    model, data = tiny_assets
    config = load_config(None, tiny_settings(model, data, tmp_path / "run", "patterns.disjoint_share=1e-9"))
    with pytest.raises(DataError, match="disjoint_share=1e-09 leaves no pairs for steps 2-3"):
        prepare_data(config, tmp_path)


def test_dry_run_and_data_inspect_count_the_halves(tiny_assets, tmp_path, capsys):
    from rahf.cli import main
    from rahf.config import load_config
    from rahf.data import load_preferences
    from rahf.preflight import format_plan, plan

    model, data = tiny_assets
    config = load_config(None, tiny_settings(model, data, tmp_path / "run"))
    counts = split_counts(load_preferences(str(data)).pairs, validation_fraction=0.2, share=0.5, seed=0)
    planned = plan(config)
    assert planned["data"]["step1_pairs"] == counts["pairs"]["step1"] > 0
    assert planned["data"]["pattern_pairs"] == counts["pairs"]["patterns"] > 0
    assert planned["examples"] == {"step1": counts["pairs"]["step1"], "fit": 2 * counts["pairs"]["patterns"]}
    assert f"{counts['pairs']['step1']} pairs train step 1, {counts['pairs']['patterns']} feed steps 2-3" in format_plan(planned)
    assert main(["data", "inspect", str(data), "--model", str(model), "--validation-fraction", "0.2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["split"] == counts
    assert counts["pairs"]["step1"] + counts["pairs"]["patterns"] == counts["pairs"]["train"] == 24 - counts["pairs"]["validation"]


def test_step1_trains_on_its_half_and_the_fit_on_the_other(aligned_run):
    from rahf.runs import read_pairs

    step1 = read_pairs(aligned_run / "data" / "step1.jsonl")
    patterns = read_pairs(aligned_run / "data" / "patterns.jsonl")
    for side in ("preferred", "dispreferred"):  # 4 steps of batch 4 over the step-1 half only
        last = json.loads((aligned_run / f"step1_{side}" / "log.json").read_text())[-1]
        assert last["epoch"] == pytest.approx(4 / math.ceil(len(step1) / 4))
    done = json.loads((aligned_run / "fit" / "DONE.json").read_text())["result"]
    assert done["examples"] == 2 * len(patterns)  # Dual patterns use both replies of each pair
    data = json.loads((aligned_run / "data" / "DONE.json").read_text())["result"]
    assert (data["step1"], data["patterns"]) == (len(step1), len(patterns))
    card = (aligned_run / "final" / "README.md").read_text()
    assert f"{len(step1)} train step 1, the other {len(patterns)} feed steps 2-3" in card


def test_no_validation_split_reads_back_as_no_pairs(tiny_assets, tmp_path):
    """validation_fraction=0 writes an empty validation file; the halves and readiness read it."""
    from rahf.config import load_config
    from rahf.runs import prepare_data, read_pairs

    model, data = tiny_assets
    config = load_config(None, tiny_settings(model, data, tmp_path / "run", "validation_fraction=0"))
    stats = prepare_data(config, tmp_path)
    assert stats["validation"] == 0
    assert read_pairs(tmp_path / "validation.jsonl") == []
    assert len(read_pairs(tmp_path / "train.jsonl")) == stats["train"] > 0


def test_baselines_data_stage_cuts_no_halves(tiny_assets, tmp_path):
    """Baselines train on all of train.jsonl: no halves written, and a share that would leave a
    half empty (which stops `rahf align`) does not stop them."""
    from rahf.config import load_config
    from rahf.runs import prepare_data

    model, data = tiny_assets
    config = load_config(None, tiny_settings(model, data, tmp_path / "run", "patterns.disjoint_share=0.999"))
    for name in ("align", "baseline"):
        (tmp_path / name).mkdir()
    with pytest.raises(DataError, match="disjoint_share"):
        prepare_data(config, tmp_path / "align")
    stats = prepare_data(config, tmp_path / "baseline", rahf_halves=False)
    assert sorted(p.name for p in (tmp_path / "baseline").iterdir()) == ["train.jsonl", "validation.jsonl"]
    assert "step1" not in stats and stats["train"] > 0
