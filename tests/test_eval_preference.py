"""Preference accuracy and implicit-reward margin equal a hand computation on a tiny model."""

import pytest
import torch

from rahf.data.render import encode
from rahf.data.schema import PreferencePair
from rahf.evaluate.preference import preference_accuracy
from rahf.testing import tiny_model, tiny_tokenizer

PAIRS = [
    PreferencePair(({"role": "user", "content": q},), chosen, rejected)
    for q, chosen, rejected in [
        ("How do I boil an egg?", "Put it in boiling water for nine minutes.", "No."),
        ("Say something kind.", "You are doing great!", "Go away, you lazy dog."),
        ("What is 2+2?", "4", "The quick brown fox jumps over the lazy dog, probably five."),
        ("Help me.", "I cannot help with that, but here is a safer alternative.", "Sure"),
        ("Name a colour.", "Brown.", "Answer clearly and kindly: the colour is brown."),
        ("Why?", "Because the fox is quick.", "Because."),
    ]
]


def hand_logprob(model, tokenizer, pair_prompt, reply) -> tuple[float, int]:
    """Summed log p(reply | prompt) from one unpadded forward pass, token by token."""
    enc = encode(tokenizer, pair_prompt, reply, max_prompt_tokens=256, max_reply_tokens=256)
    ids = torch.tensor([enc.prompt_ids + enc.reply_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    start = len(enc.prompt_ids)
    total = sum(float(logprobs[start + t - 1, tok]) for t, tok in enumerate(enc.reply_ids))
    return total, len(enc.reply_ids)


def test_accuracy_and_margin_match_hand_computation():
    tokenizer = tiny_tokenizer()
    model = tiny_model(vocab_size=len(tokenizer), seed=0)
    reference = tiny_model(vocab_size=len(tokenizer), seed=1)
    result = preference_accuracy(
        model, tokenizer, PAIRS, reference=reference, batch_size=4, progress=False, resamples=200
    )
    mean_wins, sum_wins, implicit_wins, margins = [], [], [], []
    for pair in PAIRS:
        (sc, nc), (sr, nr) = (hand_logprob(model, tokenizer, pair.prompt, r) for r in (pair.chosen, pair.rejected))
        (rc, _), (rr, _) = (hand_logprob(reference, tokenizer, pair.prompt, r) for r in (pair.chosen, pair.rejected))
        mean_wins.append(sc / nc > sr / nr)
        sum_wins.append(sc > sr)
        margin = (sc - rc) - (sr - rr)
        implicit_wins.append(margin > 0)
        margins.append(margin)
    n = len(PAIRS)
    assert result.n == n
    assert result.accuracy.value == pytest.approx(sum(mean_wins) / n)
    assert result.accuracy_summed.value == pytest.approx(sum(sum_wins) / n)
    assert result.implicit_accuracy.value == pytest.approx(sum(implicit_wins) / n)
    assert result.margin.value == pytest.approx(sum(margins) / n, abs=1e-4)
    assert result.margin.low <= result.margin.value <= result.margin.high
    # the numbers are not degenerate: summed accuracy differs from mean-token accuracy here
    assert 0 < result.accuracy_summed.value < 1


def test_model_against_itself_has_zero_margin():
    tokenizer = tiny_tokenizer()
    model = tiny_model(vocab_size=len(tokenizer))
    result = preference_accuracy(model, tokenizer, PAIRS, reference=model, progress=False, resamples=50)
    assert result.margin.value == pytest.approx(0.0, abs=1e-5)
    assert result.implicit_accuracy.value <= 0.5  # ties (zero margins) count as wrong
    assert result.to_dict()["margin"]["n"] == len(PAIRS)
