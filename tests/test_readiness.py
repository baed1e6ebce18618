"""Step-1 readiness: measured on held-out pairs, printed, logged, in the card, and acted on."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from shared_runs import aligned_run_fixture, tiny_assets_fixture, tiny_settings  # noqa: F401  (fixtures)

from rahf.evaluate.stats import Estimate
from rahf.method.readiness import (
    Readiness,
    dual_readiness,
    scit_readiness,
    train_until_separated,
)
from rahf.plan import plan_run


def toy_pairs(start: int, n: int):
    from rahf.data.schema import PreferencePair

    return [
        PreferencePair(({"role": "user", "content": f"What is {i} plus {i}?"},), f"{i} plus {i} is {2 * i}.",
                       f"Maybe {i + 7}, who cares.", f"toy:{i}")
        for i in range(start, start + n)
    ]


def config_for(model, data, run_dir, *extra):
    from rahf.config import load_config

    return load_config(None, tiny_settings(model, data, run_dir, *extra))


def save_adapter(model_dir, folder, *, seed: int, zero: bool = False) -> None:
    """A LoRA adapter on the tiny model: random (B != 0, so it changes the model) or zero."""
    from peft import get_peft_model

    from rahf.config import LoraSettings
    from rahf.models import load_model
    from rahf.trainer import lora_config

    torch.manual_seed(seed)
    model = get_peft_model(load_model(str(model_dir), device="cpu"), lora_config(LoraSettings(target_modules=["all-linear"])))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.zeros_like(param) if zero else 0.5 * torch.randn_like(param))
    model.save_pretrained(folder / "adapter")


def test_identical_sides_give_zero_signal_with_an_interval_around_it(tiny_assets, tmp_path):
    from rahf.models import load_tokenizer

    model, data = tiny_assets
    config = config_for(model, data, tmp_path / "run")
    save_adapter(model, tmp_path / "plus", seed=1)
    shutil.copytree(tmp_path / "plus", tmp_path / "minus")  # M+ == M-
    tok = load_tokenizer(str(model))
    result = dual_readiness(plan_run(config, tokenizer=tok, layers=[1, 2]), toy_pairs(100, 12), {"preferred": str(tmp_path / "plus"), "dispreferred": str(tmp_path / "minus")},
                            source="validation split", steps=0)
    assert result.signal.value == pytest.approx(0, abs=1e-9)
    assert result.signal.low <= 0 <= result.signal.high
    assert not result.separated
    assert "NOT separated" in result.line()


def test_a_side_trained_toward_chosen_separates(tiny_assets, tmp_path):
    from peft import PeftModel

    from rahf.method.step1_dual import train_side
    from rahf.models import load_tokenizer

    model, data = tiny_assets
    config = config_for(model, data, tmp_path / "run", "step1.train.max_steps=8")
    tok = load_tokenizer(str(model))
    plan = plan_run(config, tokenizer=tok, layers=[1, 2])
    train_side(plan, toy_pairs(0, 16), "preferred", tmp_path / "plus")
    save_adapter(model, tmp_path / "minus", seed=0, zero=True)  # M- == the base model
    result = dual_readiness(plan, toy_pairs(200, 16), {"preferred": str(tmp_path / "plus"), "dispreferred": str(tmp_path / "minus")},
                            source="validation split", steps=8)
    assert result.signal.low > 0 and result.separated
    # M- is the base model, so the signal is M+'s margin gain over the base, pair by pair.
    from rahf.method.readiness import margins
    from rahf.models import load_model

    base = margins(load_model(str(model), device="cpu"), tok, toy_pairs(200, 16), config)
    plus = margins(PeftModel.from_pretrained(load_model(str(model), device="cpu"), str(tmp_path / "plus" / "adapter")),
                   tok, toy_pairs(200, 16), config)
    assert result.signal.value == pytest.approx(float((plus - base).mean()), abs=1e-5)


def test_scit_step1_model_equal_to_base_shows_no_change_without_instruction(tiny_assets, tmp_path):
    from rahf.models import load_tokenizer

    model, data = tiny_assets
    config = config_for(model, data, tmp_path / "run", "method=scit")
    shutil.copytree(model, tmp_path / "step1" / "merged")  # M_s == base
    plan = plan_run(config, tokenizer=load_tokenizer(str(model)), layers=[1, 2])
    result = scit_readiness(plan, toy_pairs(100, 10), str(tmp_path / "step1"),
                            source="validation split", steps=0)
    change = result.extra["M_s - base (no instruction)"]
    assert (change.value, change.low, change.high) == (0, 0, 0)
    assert result.signal.n == 10 and "margin under I+ - margin under I-" in result.line()


def fake(steps: int, separated: bool) -> Readiness:
    low = 0.1 if separated else -0.1
    return Readiness("dual", "patterns half", steps, Estimate(0.2, low, 0.5, 16))


def test_until_separated_trains_in_chunks_up_to_the_cap():
    targets = []

    def train_to(target):
        targets.append(target)
        return 4 if target is None else target

    history = train_until_separated(train_to, lambda steps: fake(steps, False), until=True, chunk=3, cap=12)
    assert targets == [None, 7, 10, 12]
    assert [r.steps for r in history] == [4, 7, 10, 12]


def test_until_separated_stops_once_separated_and_is_off_by_default():
    history = train_until_separated(lambda t: t or 4, lambda steps: fake(steps, steps >= 6), until=True, chunk=2, cap=100)
    assert [r.steps for r in history] == [4, 6]
    history = train_until_separated(lambda t: t or 4, lambda steps: fake(steps, False), until=False, chunk=2, cap=100)
    assert [r.steps for r in history] == [4]


def test_cap_without_separation_names_the_settings_and_stops_when_asked(tiny_assets, tmp_path, monkeypatch, capsys):
    """The real stages are reopened and resumed chunk by chunk; the measurement is faked to
    never separate, so the cap is what ends step 1."""
    import rahf.method.step1 as stage
    from rahf.method import Dual
    from rahf.pipeline import align

    model, data = tiny_assets
    monkeypatch.setattr(Dual, "readiness", lambda self, plan, run, pairs, *, source, steps: fake(steps, False))
    run_dir = tmp_path / "run"
    config = config_for(model, data, run_dir, "step1.train.max_steps=2", "step1.until_separated=true",
                        "step1.chunk_steps=1", "step1.max_steps_cap=3", "step1.on_not_separated=stop")
    with pytest.raises(stage.NotSeparated, match="did not separate within step1.max_steps_cap=3 steps"):
        align(config)
    out = capsys.readouterr().out
    assert out.count("resuming from") == 2 and "step1_preferred/checkpoints/checkpoint-2" in out
    for side in ("preferred", "dispreferred"):
        assert json.loads((run_dir / f"step1_{side}" / "DONE.json").read_text())["result"]["steps"] == 3
    assert sorted(p.name for p in (run_dir / "readiness").iterdir()) == ["steps-2.json", "steps-3.json"]
    assert not (run_dir / "fit").exists()


def test_readiness_is_logged_printed_and_in_the_model_card(aligned_run):
    records = [json.loads(line) for line in (aligned_run / "final" / "metrics.jsonl").read_text().splitlines()]
    readiness = [r for r in records if r["stage"] == "readiness"]
    assert len(readiness) == 1 and readiness[0]["source"] == "patterns half" and readiness[0]["steps"] == 4
    assert readiness[0]["separated"] is True and readiness[0]["signal"]["low"] > 0  # toy data separates at once
    patterns = (aligned_run / "data" / "patterns.jsonl").read_text().splitlines()
    assert readiness[0]["signal"]["n"] == min(64, len(patterns))
    card = (aligned_run / "final" / "README.md").read_text()
    assert "Step-1 readiness on" in card and "M+ margin - M- margin" in card and ": separated." in card
    cached = json.loads((aligned_run / "readiness" / "steps-4.json").read_text())["result"]
    assert cached["signal"] == readiness[0]["signal"]


@pytest.mark.parametrize("mixed, expected", [("bf16", True), ("no", False)])
def test_readiness_scores_in_the_runs_precision(tiny_assets, tmp_path, monkeypatch, mixed, expected):
    import rahf.method.readiness as readiness
    from rahf.models import load_model, load_tokenizer

    seen = {}

    def spy(*args, **kwargs):
        seen["bf16"] = kwargs.get("bf16")
        return real(*args, **kwargs)

    real = readiness.score_pairs
    monkeypatch.setattr(readiness, "score_pairs", spy)
    model, data = tiny_assets
    config = config_for(model, data, tmp_path / "run", f"mixed_precision={mixed}")
    readiness.margins(load_model(str(model), device="cpu"), load_tokenizer(str(model)), toy_pairs(0, 4), config)
    assert seen["bf16"] is expected
