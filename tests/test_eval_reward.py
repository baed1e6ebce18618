"""Reward-model scoring, model-vs-baseline comparison, and a tiny `train-rm` run."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from rahf.evaluate.reward import compare, load_reward_model, render_for_reward, score_rewards
from rahf.evaluate.reward_model import RewardModelConfig, train_reward_model
from rahf.testing import save_tiny, tiny_tokenizer


def save_tiny_rm(path):
    """A tiny random sequence-classification reward model folder."""
    save_tiny(path / "lm")
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(path / "lm", num_labels=1)
    rm.save_pretrained(path / "rm")
    tiny_tokenizer().save_pretrained(path / "rm")
    return path / "rm"


PROMPTS = [[{"role": "user", "content": "How do I boil an egg?"}], [{"role": "user", "content": "Hi"}]] * 3
REPLIES = ["Nine minutes.", "Hello!", "I cannot help with that.", "The quick brown fox.", "", "Sure, a b c."]


def test_scores_do_not_depend_on_batching_and_identical_replies_tie(tmp_path):
    rm = load_reward_model(str(save_tiny_rm(tmp_path)), device="cpu")
    assert rm.model.config.pad_token_id is not None
    batched = score_rewards(rm, PROMPTS, REPLIES, batch_size=6, progress=False)
    single = score_rewards(rm, PROMPTS, REPLIES, batch_size=1, progress=False)
    np.testing.assert_allclose(batched, single, atol=1e-5)
    comparison = compare(batched, single, [1] * 6, [1] * 6, resamples=50)
    assert comparison.win_rate.value == 0.5 and comparison.ties == 6


def test_chat_template_is_applied_to_prompt_and_reply():
    tokenizer = tiny_tokenizer()
    text = render_for_reward(tokenizer, PROMPTS[0], "Nine minutes.")
    assert text.index("How do I boil") < text.index("<|im_start|>assistant\nNine minutes.<|im_end|>")
    plain = render_for_reward(tiny_tokenizer(chat_template=False), PROMPTS[0], "Nine minutes.")
    assert plain.startswith("Human: How do I boil an egg?\n\nAssistant: Nine minutes.")


def test_compare_counts_wins_ties_losses():
    result = compare(np.array([2.0, 1.0, 3.0, 0.0]), np.array([1.0, 1.0, 4.0, -1.0]),
                     [10, 20, 30, 40], [12, 18, 33, 35], resamples=100)
    assert (result.wins, result.ties, result.losses) == (2, 1, 1)
    assert result.win_rate.value == pytest.approx(2.5 / 4)
    assert result.mean_score.value == pytest.approx(1.5)
    assert 0 <= result.length_controlled_win_rate.value <= 1


def _write_pairs(path, n=40):
    rows = []
    for i in range(n):
        rows.append({"prompt": f"Question number {i}: how do I boil an egg?",
                     "chosen": f"Put it in boiling water for {i % 9 + 1} minutes.",
                     "rejected": "No."})
    rows.append({"prompt": "bad row", "chosen": "same", "rejected": "same"})  # skipped, counted
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize(("method", "lora_layers"), [("lora", None), ("head-only", None), ("lora", 1)])
def test_train_rm_saves_a_loadable_reward_model(tmp_path, method, lora_layers):
    base = save_tiny(tmp_path / "base")
    data = _write_pairs(tmp_path / "pairs.jsonl")
    config = RewardModelConfig(
        data=str(data), out=str(tmp_path / "rm"), model=str(base), method=method, max_steps=3,
        lora_layers=lora_layers,
        batch_size=4, validation_fraction=0.25, max_length=64, resamples=50, progress=False,
    )
    metrics = train_reward_model(config)
    assert metrics["steps"] == 3
    assert metrics["n_train"] + metrics["n_validation"] == 40
    assert metrics["invalid_rows"] == {"identical_replies": 1}
    assert metrics["longer_wins_accuracy"]["value"] == 1.0  # chosen is always longer here
    assert 0 <= metrics["validation_accuracy"]["value"] <= 1
    saved = json.loads((tmp_path / "rm" / "metrics.json").read_text())
    assert saved["validation_accuracy"] == metrics["validation_accuracy"]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert model.config.num_labels == 1
    assert not any("lora" in name for name in model.state_dict())  # merged
    base_lm = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    for layer in (0, 3):  # the tiny model has 4 blocks; lora_layers=1 adapts only block 3
        key = f"model.layers.{layer}.self_attn.q_proj.weight"
        changed = not torch.equal(model.state_dict()[key], base_lm.state_dict()[key])
        adapted = method == "lora" and (lora_layers is None or layer == 3)
        assert changed == adapted  # head-only leaves the backbone as it was
    rm = load_reward_model(str(tmp_path / "rm"), device="cpu")
    assert score_rewards(rm, PROMPTS[:2], REPLIES[:2], progress=False).shape == (2,)
