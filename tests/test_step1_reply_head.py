"""Step 1's losses run the LM head on reply positions only, and equal the full-logits losses.

References are computed the way step 1 did before (the head over every position): Hugging
Face's causal-LM loss for Dual, a log-softmax over all logits gathered at the reply for SCIT and
scoring. fp32, so the two may differ only by summation order.
"""

from __future__ import annotations

import pytest
import torch

from rahf.data.render import encode
from rahf.data.schema import PreferencePair

PAIRS = [
    PreferencePair(({"role": "user", "content": "What is " + "1 plus " * i + f"{i}?"},),
                   f"{i} plus {i} is {2 * i}." + " Yes." * (i % 3), f"Maybe {i + 7}.", f"toy:{i}")
    for i in range(1, 6)
]
INSTRUCTIONS = ("You are a helpful, honest and harmless assistant.", "You are rude.")


@pytest.fixture(scope="module")
def tok():
    from rahf.testing import tiny_tokenizer

    return tiny_tokenizer()


def fresh_model(tok):
    from rahf.testing import tiny_model

    return tiny_model(vocab_size=len(tok), layers=2, hidden=32, seed=3)


def encoded(tok, instruction=None):
    return [encode(tok, p.prompt, p.chosen, instruction=instruction, max_reply_tokens=12) for p in PAIRS]


def grads(model) -> dict[str, torch.Tensor]:
    out = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_same(loss, reference, model) -> None:
    """Equal losses, and equal gradients for every parameter (the reference's first)."""
    reference.backward()
    expected = grads(model)
    loss.backward()
    got = grads(model)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-7)
    assert expected.keys() == got.keys() and len(got) == len(list(model.parameters()))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


def full_logits_logprobs(model, batch) -> torch.Tensor:
    """The head over every position, then each reply token's log-probability; 0 past a reply."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    width = int(batch["reply_len"].max())
    out = torch.zeros(len(batch["input_ids"]), width)
    for b in range(len(out)):
        for t in range(int(batch["reply_len"][b])):
            p = int(batch["reply_start"][b]) + t
            out[b, t] = logprobs[b, p - 1, batch["input_ids"][b, p]]
    return out


def count_head_rows(model) -> list[int]:
    rows: list[int] = []
    model.lm_head.register_forward_hook(lambda _m, inputs, _o: rows.append(inputs[0].reshape(-1, inputs[0].shape[-1]).shape[0]))
    return rows


def test_dual_loss_equals_hf_full_logits_loss_and_its_gradients(tok):
    from rahf.method.step1_dual import ReplyOnlyCollator, reply_sft_loss

    model = fresh_model(tok)
    batch = ReplyOnlyCollator(tok.pad_token_id)(encoded(tok))
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # rows of different lengths: padding in play
    reference = model(**batch).loss  # HF: shifted labels, mean over every label token of the batch
    assert_same(reply_sft_loss(model, batch), reference, model)


def test_dual_loss_runs_the_head_on_reply_tokens_only(tok):
    from rahf.method.step1_dual import ReplyOnlyCollator, reply_sft_loss

    model = fresh_model(tok)
    batch = ReplyOnlyCollator(tok.pad_token_id)(encoded(tok))
    rows = count_head_rows(model)
    reply_sft_loss(model, batch)
    assert rows == [int((batch["labels"] != -100).sum())]
    assert rows[0] < batch["input_ids"].numel() / 2


def test_reply_token_logprobs_equal_full_logits_and_head_runs_on_replies(tok):
    from rahf.hidden_states import pad_batch, reply_token_logprobs

    model = fresh_model(tok)
    batch = pad_batch(encoded(tok, INSTRUCTIONS[0]), tok.pad_token_id)
    rows = count_head_rows(model)
    got = reply_token_logprobs(model, batch)
    assert rows == [int(batch["reply_len"].sum())]
    expected = full_logits_logprobs(model, batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (got[torch.arange(got.shape[1])[None, :] >= batch["reply_len"][:, None]] == 0).all()


def test_scit_loss_and_gradients_equal_the_full_logits_loss(tok):
    from rahf.method.step1_scit import SCITCollator, SCITExample, SCITTrainer, scit_loss

    model = fresh_model(tok)
    good, bad = INSTRUCTIONS
    examples = [SCITExample(m, s) for m, s in zip(encoded(tok, good), encoded(tok, bad), strict=True)]
    batch = SCITCollator(tok.pad_token_id)(examples)
    trainer = SCITTrainer.__new__(SCITTrainer)  # stage_loss reads only label_smoothing
    trainer.label_smoothing = 0.2
    mean = full_logits_logprobs(model, batch).sum(1) / batch["reply_len"]
    reference = scit_loss(*mean.chunk(2), 0.2)
    assert_same(trainer.stage_loss(model, batch), reference, model)


def test_reply_only_loss_refuses_a_model_that_ignores_the_mask(tok):
    """A model whose forward slices ``logits_to_keep`` the old way must fail loudly, not train on
    misaligned logits."""
    from rahf.hidden_states import logits_at, pad_batch

    class AllPositions(torch.nn.Module):
        def forward(self, input_ids, attention_mask, use_cache, logits_to_keep):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 7)})()

    batch = pad_batch(encoded(tok), tok.pad_token_id)
    keep = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    keep[:, 1] = True
    with pytest.raises(ValueError, match="ignores a boolean logits_to_keep mask"):
        logits_at(AllPositions(), batch, keep)


def test_a_reply_at_position_zero_is_refused():
    """No logits predict a sequence's first token: an empty prompt must fail, not shift the rows."""
    from rahf.hidden_states import predicting_mask

    mask = predicting_mask(torch.tensor([2, 1]), torch.tensor([2, 3]), 5)
    assert mask.tolist() == [[False, True, True, False, False], [True, True, True, False, False]]
    with pytest.raises(ValueError, match="position 0"):
        predicting_mask(torch.tensor([0, 2]), torch.tensor([2, 2]), 5)
