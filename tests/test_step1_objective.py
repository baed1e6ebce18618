"""Dual options: step 1 trained with a preference objective, and aligning M+ instead of the base."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from shared_runs import tiny_assets_fixture, tiny_settings  # noqa: F401  (fixtures)

from rahf.config import ConfigError, load_config
from rahf.data.schema import PreferencePair

PAIRS = [
    PreferencePair(({"role": "user", "content": f"What is {i} plus {i}?"},), f"{i} plus {i} is {2 * i}.",
                   f"Maybe {i + 7}, who cares.", f"toy:{i}")
    for i in range(12)
]


@pytest.fixture(scope="module")
def sides(tiny_assets, tmp_path_factory):
    """Both Dual sides trained with ``step1.objective=preference`` (DPO), M+ also merged."""
    from rahf.method.step1_dual import train_side
    from rahf.models import load_tokenizer
    from rahf.plan import plan_run

    model, data = tiny_assets
    root = tmp_path_factory.mktemp("objective")
    config = load_config(None, tiny_settings(model, data, root / "run", "step1.objective=preference",
                                             "patterns.align_target=preferred", "step1.train.max_steps=6"))
    tok = load_tokenizer(str(model))
    plan = plan_run(config, tokenizer=tok, layers=[1, 2])
    results = {side: train_side(plan, PAIRS, side, root / f"step1_{side}") for side in ("preferred", "dispreferred")}
    return config, tok, root, results


def margin(model, tok, pairs) -> torch.Tensor:
    from rahf.evaluate.scoring import score_pairs

    scores = score_pairs(model, tok, pairs, max_prompt_tokens=64, max_reply_tokens=16, progress=False)
    return scores.chosen_sum - scores.rejected_sum


def test_swapped_pairs_exchange_the_replies():
    from rahf.method.step1_objectives import swapped

    pair = swapped(PAIRS[:1])[0]
    assert (pair.chosen, pair.rejected, pair.prompt) == (PAIRS[0].rejected, PAIRS[0].chosen, PAIRS[0].prompt)


def test_preference_objective_moves_the_sides_apart(sides, tiny_assets):
    """M+ raises the chosen-minus-rejected margin over the base, M- lowers it: DPO and swapped DPO."""
    from peft import PeftModel

    from rahf.models import load_model

    config, tok, root, results = sides
    model_dir, _ = tiny_assets
    assert all(r["steps"] == 6 and r["log"] for r in results.values())
    base = margin(load_model(str(model_dir), device="cpu"), tok, PAIRS)
    plus = margin(load_model(str(root / "step1_preferred" / "merged"), device="cpu"), tok, PAIRS)
    minus = margin(PeftModel.from_pretrained(load_model(str(model_dir), device="cpu"),
                                             str(root / "step1_dispreferred" / "adapter")), tok, PAIRS)
    assert (plus - base).mean() > 0 > (minus - base).mean()
    assert not (root / "step1_dispreferred" / "merged").exists()  # only M+ is aligned, so only it is merged


def test_aligning_the_preferred_model_reads_the_reference_patterns(sides, tiny_assets):
    """align_target=preferred: the fitted model is M+; A_o is M+ under I+, A_+ is M+, A_- is M-."""
    from peft import PeftModel

    from rahf.hidden_states import reply_hidden_states
    from rahf.method.patterns import (
        FROZEN,
        collate_roles,
        fit_examples,
        frozen_patterns,
        pattern_source,
    )
    from rahf.method.step1_dual import load_preferred_target
    from rahf.models import load_model
    from rahf.plan import plan_run
    from rahf.runs import RunDir

    config, tok, root, _ = sides
    model_dir, _ = tiny_assets
    plan = plan_run(config, tokenizer=tok, layers=[1, 2])
    assert Path(plan.method.fit_weights(plan, RunDir(root))) == (root / "step1_preferred" / "merged").resolve()
    passes = pattern_source(config)
    assert passes["orig"].state == passes["preferred"].state == FROZEN
    assert passes["orig"].instruction == config.preferred_instruction and passes["preferred"].instruction is None
    folders = {s: str(root / f"step1_{s}") for s in ("preferred", "dispreferred")}
    model, frozen = load_preferred_target(plan, str(root / "step1_preferred" / "merged"), folders)
    batches = collate_roles(fit_examples(PAIRS[:3], tok, config), tok.pad_token_id)
    patterns = frozen_patterns(frozen, passes, batches, [1, 2], pad_id=tok.pad_token_id)
    plus = load_model(str(root / "step1_preferred" / "merged"), device="cpu").eval()
    minus = PeftModel.from_pretrained(load_model(str(model_dir), device="cpu"), folders["dispreferred"] + "/adapter").eval()
    with torch.no_grad():
        for role, reference in (("orig", plus), ("preferred", plus), ("dispreferred", minus)):
            expected = reply_hidden_states(reference, batches[role], [1, 2])
            assert torch.allclose(patterns[role], expected, atol=1e-4), role
    assert not torch.allclose(patterns["orig"], patterns["preferred"], atol=1e-3)  # I+ changes A_o
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("option", ["step1.objective=preference", "patterns.align_target=preferred"])
def test_dual_options_are_refused_for_scit(option):
    with pytest.raises(ConfigError, match="Dual options"):
        load_config(None, ["method=scit", option])


def test_shared_length_needs_the_preference_objective():
    with pytest.raises(ConfigError, match="step1.shared_length cuts the pairs of step1.objective=preference"):
        load_config(None, ["method=dual", "step1.shared_length=true"])
    assert load_config(None, ["method=dual", "step1.objective=preference", "step1.shared_length=true"]).step1.shared_length


def test_step1_loss_type_needs_the_preference_objective_and_a_known_loss():
    for key in ("loss_type=sigmoid_norm", "sft_weight=1"):
        with pytest.raises(ConfigError, match=f"step1.{key.split('=')[0]} shapes the DPO loss of step1.objective=preference"):
            load_config(None, ["method=dual", f"step1.{key}"])
    with pytest.raises(ConfigError, match="step1.loss_type"):
        load_config(None, ["method=dual", "step1.objective=preference", "step1.loss_type=nope"])
    with pytest.raises(ConfigError, match="step1.sft_weight must be a number >= 0, got -1"):
        load_config(None, ["method=dual", "step1.objective=preference", "step1.sft_weight=-1"])
    config = load_config(None, ["method=dual", "step1.objective=preference", "step1.loss_type=sigmoid_norm"])
    assert config.step1.loss_type == "sigmoid_norm"


def test_step1_passes_its_loss_type_to_dpo(tiny_assets, tmp_path, monkeypatch):
    """The Dual side's DPO trainer gets step1.loss_type, step1.sft_weight and step1.beta (not the baseline's)."""
    import rahf.baselines.dpo as dpo
    from rahf.method.step1_objectives import train_side_preference
    from rahf.models import load_tokenizer
    from rahf.plan import plan_run

    model, data = tiny_assets
    config = load_config(None, tiny_settings(model, data, tmp_path / "run", "step1.objective=preference",
                                             "step1.loss_type=sigmoid_norm", "step1.beta=4", "step1.sft_weight=0.5",
                                             "step1.train.max_steps=1"))
    seen = {}

    def spy(*args, **kwargs):
        trainer = real(*args, **kwargs)
        seen.update(loss=trainer.loss_types, weights=trainer.loss_weights, beta=trainer.beta)
        return trainer

    real = dpo.build_dpo_trainer
    monkeypatch.setattr(dpo, "build_dpo_trainer", spy)
    plan = plan_run(config, tokenizer=load_tokenizer(str(model)), layers=[1, 2])
    train_side_preference(plan, PAIRS, "preferred", tmp_path / "side", merged=False)
    assert seen == {"loss": ["sigmoid_norm", "sft"], "weights": [1.0, 0.5], "beta": 4.0}
