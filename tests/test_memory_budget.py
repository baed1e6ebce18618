"""Gradient checkpointing chosen by a stated memory budget (issue #15, ``rahf.memory``).

``gradient_checkpointing: auto`` turns checkpointing on only for a stage whose estimated peak
without it exceeds ``memory_budget_gb``; true and false are kept as given. The estimate's parts
that can be counted exactly (weights, LoRA parameters) are checked against a loaded model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from rahf.config import AlignConfig, BaselineConfig, ConfigError, load_config, load_saved_config
from rahf.memory import GB, architecture, choose_checkpointing, estimate, stage_workload
from rahf.testing import save_tiny
from rahf.trainer import GuardedTrainer, train_stage, trainable_model, training_arguments

LAYERS = 4
HIDDEN = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(save_tiny(tmp_path_factory.mktemp("model") / "tiny", layers=LAYERS, hidden=HIDDEN))


def _config(tiny: str, *extra: str) -> AlignConfig:
    return load_config(None, [f"model={tiny}", "device=cpu", "report_to=[none]", "patterns.target_layers=[1,3]",
                              "max_prompt_tokens=64", "max_reply_tokens=16", *extra])


def _args(config: AlignConfig, tmp_path: Path, stage: str = "fit"):
    train = config.fit.train if stage == "fit" else config.step1.train
    return training_arguments(config, train, tmp_path / stage / "checkpoints", stage=stage)


@pytest.mark.parametrize("stage", ["fit", "step1-preferred"])
def test_auto_is_off_under_a_big_budget_and_on_under_a_tiny_one(tiny, tmp_path, stage, capsys):
    roomy = _args(_config(tiny, "memory_budget_gb=1000"), tmp_path, stage)
    assert (roomy.activation_checkpointing, roomy.gradient_checkpointing) == (False, False)
    assert "gradient checkpointing off (auto)" in capsys.readouterr().out
    tight = _args(_config(tiny, "memory_budget_gb=0.0001"), tmp_path, stage)
    assert (tight.activation_checkpointing, tight.gradient_checkpointing) == (True, True)
    line = capsys.readouterr().out
    assert f"rahf: {stage}: gradient checkpointing on (auto): estimated peak" in line
    assert "budget 0.0001 GB (memory_budget_gb)" in line
    record = tight.rahf_checkpointing
    assert record["enabled"] and record["setting"] == "auto" and record["budget_gb"] == pytest.approx(0.0001, rel=1e-4)
    assert record["without_gb"] > record["with_gb"] > 0  # checkpointing is what lowers the peak


def test_auto_compares_the_budget_with_the_estimate_without_checkpointing(tiny, tmp_path):
    config = _config(tiny)
    without = choose_checkpointing(config, config.fit.train, "fit").without_gb
    just_over = _config(tiny, f"memory_budget_gb={without * 1.01}")
    just_under = _config(tiny, f"memory_budget_gb={without * 0.99}")
    assert not choose_checkpointing(just_over, just_over.fit.train, "fit").enabled
    assert choose_checkpointing(just_under, just_under.fit.train, "fit").enabled


def test_default_budget_is_the_devices_memory(tiny):
    import psutil

    config = _config(tiny)
    assert (config.gradient_checkpointing, config.memory_budget_gb) == ("auto", None)
    choice = choose_checkpointing(config, config.fit.train, "fit")
    assert choice.budget_from == "available RAM + this process's"
    held = psutil.Process().memory_info().rss
    assert choice.budget_gb * GB >= held  # at least what this process already holds
    assert not choice.enabled  # a tiny model fits in any machine's memory


@pytest.mark.parametrize(("setting", "budget", "expected"), [("true", 1000, True), ("false", 0.0001, False)])
def test_explicit_settings_are_kept_whatever_the_budget(tiny, tmp_path, setting, budget, expected, capsys):
    args = _args(_config(tiny, f"gradient_checkpointing={setting}", f"memory_budget_gb={budget}"), tmp_path)
    assert (args.activation_checkpointing, args.gradient_checkpointing) == (expected, expected)
    assert args.rahf_checkpointing == {"stage": "fit", "setting": expected, "enabled": expected, "without_gb": None,
                                       "with_gb": None, "budget_gb": None, "budget_from": ""}
    assert "gradient checkpointing" not in capsys.readouterr().out  # printed only when auto decides


def test_a_model_without_blocks_rahf_can_find_trains_as_before(tiny, monkeypatch):
    import rahf.memory

    def unreadable(path):
        raise ValueError("cannot find the 4 decoder blocks of Odd")

    monkeypatch.setattr(rahf.memory, "architecture", unreadable)
    config = _config(tiny, "memory_budget_gb=0.0001")
    choice = choose_checkpointing(config, config.fit.train, "fit")
    assert not choice.enabled and choice.without_gb is None
    assert choice.line() == "rahf: fit: gradient checkpointing off (auto; no estimate: cannot find the 4 decoder blocks of Odd)"


def test_estimate_counts_the_loaded_weights_and_the_adapter_exactly(tiny):
    config = _config(tiny)
    arch = architecture(tiny)
    model = trainable_model(config, tiny, None)
    assert arch.params == sum(p.numel() for p in model.parameters())
    assert (arch.hidden, arch.layers) == (HIDDEN, LAYERS)

    # The fit's adapter: q_proj, v_proj of blocks 0..2 (below target layer 3), by hand:
    # q 32 -> 32 and v 32 -> 16 (2 key-value heads of 8), rank 8: 8 * (64 + 48) per block.
    work = stage_workload(config, config.fit.train, "fit", arch)
    assert work.trained_params == 3 * 8 * (64 + 48)
    from rahf.trainer import add_lora

    fitted = add_lora(model, config.fit.lora, blocks=range(3))
    assert work.trained_params == sum(p.numel() for p in fitted.parameters() if p.requires_grad)
    assert (work.rows, work.tokens, work.blocks, work.logit_positions, work.target_layers) == (4, 64 + 16, 3, 0, 2)

    part = estimate(arch, work, weight_bytes=4, checkpointing=False)
    assert part.weights == 4 * arch.params
    assert part.trained == 4 * 4 * work.trained_params  # fp32 weight, gradient, two AdamW moments
    assert part.targets == 3 * 4 * 80 * 2 * HIDDEN * 4  # three roles' fp32 states at two layers
    assert part.logits == 0  # the fit computes no logits
    with_ = estimate(arch, work, weight_bytes=4, checkpointing=True)
    assert with_.activations < part.activations and with_.weights == part.weights


def test_stage_workloads_follow_the_stage(tiny):
    arch = architecture(tiny)
    config = _config(tiny, "method=scit", "step1.train.batch_size=2")
    scit = stage_workload(config, config.step1.train, "step1-scit", arch)
    assert (scit.rows, scit.blocks, scit.logit_positions) == (4, LAYERS, 16)  # matching + swapped rows, reply logits
    # every linear of every block, rank 16 (step 1's default all-linear LoRA)
    assert scit.trained_params == sum(16 * (n_in + n_out) for _, _, n_in, n_out in arch.linears)
    dpo = BaselineConfig(model=tiny, method="dpo", max_prompt_tokens=64, max_reply_tokens=16)
    work = stage_workload(dpo, dpo.train, "dpo", arch)
    assert (work.rows, work.tokens, work.logit_positions) == (8, 80, 80)
    full = dataclasses.replace(dpo, full_finetune=True)
    assert stage_workload(full, full.train, "dpo", arch).trained_params == arch.params


def _lm_rows(n: int = 8, width: int = 12) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, 300, (width,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones(width, dtype=torch.long), "labels": ids.clone()})
    return rows


def _train(tiny: str, tmp_path: Path, setting: str) -> tuple[dict, dict]:
    config = _config(tiny, f"gradient_checkpointing={setting}", "memory_budget_gb=0.0001", "mixed_precision=no",
                     "step1.train.max_steps=3", "step1.train.batch_size=4", "step1.lora.dropout=0.1")
    out = tmp_path / setting
    torch.manual_seed(0)  # the same LoRA initialisation on both sides
    model = trainable_model(config, tiny, config.step1.lora)
    trainer = GuardedTrainer(model=model, args=training_arguments(config, config.step1.train, out / "checkpoints",
                                                                  stage="step1-preferred"),
                             train_dataset=_lm_rows())
    result = train_stage(trainer, out, merged=False)
    weights = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    return result, weights


def test_checkpointing_changes_no_weight_and_the_choice_is_recorded(tiny, tmp_path):
    """Recomputing activations gives the same gradients (dropout masks included), so a run
    folder may resume with another setting (runs._COSMETIC)."""
    (on, weights_on), (off, weights_off) = _train(tiny, tmp_path, "auto"), _train(tiny, tmp_path, "false")
    assert on["checkpointing"]["enabled"] and not off["checkpointing"]["enabled"]
    assert on["steps"] == off["steps"] == 3
    assert weights_on.keys() == weights_off.keys()
    for name in weights_on:
        torch.testing.assert_close(weights_on[name], weights_off[name], rtol=0, atol=0)
    assert any(not torch.equal(w, torch.zeros_like(w)) for w in weights_on.values())


def test_old_boolean_config_files_and_run_folders_still_load(tiny, tmp_path):
    from rahf.runs import RunDir

    for value in (True, False):
        path = tmp_path / f"old-{value}.yaml"
        path.write_text(f"model: {tiny}\ngradient_checkpointing: {str(value).lower()}\n")
        assert load_config(path).gradient_checkpointing is value
        assert load_config(None, [f"gradient_checkpointing={str(value).lower()}"]).gradient_checkpointing is value
    saved = tmp_path / "config.yaml"
    saved.write_text(f"model: {tiny}\ngradient_checkpointing: false\n")  # an older run folder's config.yaml
    assert load_saved_config(saved).gradient_checkpointing is False

    # An older run folder (default gradient_checkpointing: false, no memory_budget_gb) resumes
    # under today's default, auto: checkpointing changes no result.
    config = dataclasses.replace(_config(tiny), run_dir=str(tmp_path / "run"))
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    old = {k: v for k, v in config.to_dict().items() if k not in ("run_dir", "report_to", "logging_steps", "device", "memory_budget_gb")}
    (run.root / "config.json").write_text(json.dumps(old | {"gradient_checkpointing": False}))
    run.check_config(config, overwrite=False)
    (run.root / "config.json").write_text(json.dumps(old | {"gradient_checkpointing": False, "seed": 7}))
    with pytest.raises(ConfigError, match="seed differ"):
        run.check_config(config, overwrite=False)


@pytest.mark.parametrize(("override", "message"), [
    ("gradient_checkpointing=maybe", r"gradient_checkpointing must be true, false or auto, got 'maybe'"),
    ("gradient_checkpointing=1", r"gradient_checkpointing must be true, false or auto, got 1"),
    ("memory_budget_gb=-2", r"memory_budget_gb must be a positive number, got -2"),
    ("memory_budget_gb=lots", r"memory_budget_gb must be a number"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
