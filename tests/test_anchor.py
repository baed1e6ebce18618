"""fit.anchor_weight: the next-token KL read on the frozen model's own greedy replies (on-policy)."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from fit_terms import PAIRS, loss_only_trainer, move_adapter, tiny_fixture, train_loss  # noqa: F401  (fixture)

from rahf.config import ConfigError, load_config
from rahf.data.schema import PreferencePair
from rahf.evaluate.generation import cut_at_stop
from rahf.hidden_states import logits_at, predicting_mask
from rahf.method import anchor as anchor_module
from rahf.method.anchor import AnchorReplies, batch_prompts
from rahf.method.fit import FitCollator, FitTrainer, load_fit_model, next_token_kl
from rahf.method.patterns import FROZEN, fit_examples, pattern_source
from rahf.models import stop_token_ids
from rahf.testing import tiny_tokenizer


def _trainer(tiny, anchor_weight: float):
    """Both replies of each pair (so a batch holds each prompt twice), anchor replies of 6 tokens."""
    return loss_only_trainer(tiny, "patterns.reply=both", anchor_weight=anchor_weight, anchor_tokens=6)


def _greedy(model, prompt: list[int], steps: int, stop_ids: list[int]) -> list[int]:
    """Greedy decoding by hand: argmax of a full forward pass per new token, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)
            if token in stop_ids:
                break
    return ids[len(prompt):]


def _anchor_drift(model, frozen, trainer, batch) -> float:
    """The anchor term computed apart from the trainer: trained vs adapter-off logits on the kept replies."""
    with frozen.state(FROZEN) as base:
        anchored = trainer.anchors.batch(base, batch_prompts(batch["orig"]))
    keep = predicting_mask(anchored["reply_start"], anchored["reply_len"], anchored["input_ids"].shape[1])
    with torch.no_grad():
        trained = logits_at(model, anchored, keep)
        with frozen.state(FROZEN) as base:
            before = logits_at(base, anchored, keep)
    return next_token_kl(before, trained).item()


def test_cut_at_stop_drops_the_stop_token_and_what_follows():
    assert cut_at_stop([5, 6, 2, 0, 0], [2, 9]) == ([5, 6], True)
    assert cut_at_stop([5, 6, 7], [2]) == ([5, 6, 7], False)
    assert cut_at_stop([9, 1], [2, 9]) == ([], True)


def test_batch_prompts_reads_each_rows_prompt():
    batch = {"input_ids": torch.tensor([[1, 2, 3, 4, 0], [5, 6, 7, 8, 9]]), "reply_start": torch.tensor([2, 3])}
    assert batch_prompts(batch) == [[1, 2], [5, 6, 7]]


def test_anchor_replies_are_the_frozen_models_greedy_replies_generated_once(tiny):
    trainer, model, frozen, batch = _trainer(tiny, 1.0)
    prompts = batch_prompts(batch["orig"])
    distinct = list(dict.fromkeys(tuple(p) for p in prompts))
    assert len(prompts) == 4 and len(distinct) == 2  # patterns.reply both: a pair's two examples share the prompt
    model.eval()
    with frozen.state(FROZEN) as base:
        by_hand = [_greedy(base, list(p), 6, []) for p in distinct]
    # The third greedy token of the first prompt as the only stop token: that reply ends with it.
    stops = [by_hand[0][2]]
    replies = AnchorReplies(stop_ids=stops, pad_id=0, max_new_tokens=6)
    with mock.patch.object(anchor_module, "continue_batch", wraps=anchor_module.continue_batch) as generate:
        with frozen.state(FROZEN) as base:
            got = replies.batch(base, prompts)
            assert generate.call_count == 1  # both prompts in one generate call
            again = replies.batch(base, prompts[::-1])
            assert generate.call_count == 1  # kept, not generated again
    for row, prompt in enumerate(distinct):
        expected = _greedy(model, list(prompt), 6, stops)
        start, length = int(got["reply_start"][row]), int(got["reply_len"][row])
        assert start == len(prompt)
        assert got["input_ids"][row, :start].tolist() == list(prompt)
        assert got["input_ids"][row, start : start + length].tolist() == expected
    assert got["input_ids"][0, int(got["reply_start"][0]) :].tolist()[: int(got["reply_len"][0])][-1] == stops[0]
    assert int(got["reply_len"][0]) <= 3
    assert again["input_ids"].shape[0] == 2  # one row per distinct prompt


def test_anchor_term_adds_its_weight_times_the_kl_on_the_frozen_models_replies(tiny):
    trainer, model, frozen, batch = _trainer(tiny, 3.0)
    move_adapter(model)
    model.eval()
    drift = _anchor_drift(model, frozen, trainer, batch)
    assert drift > 1e-6
    weighted = trainer.stage_loss(model, batch).item()
    trainer.anchor_weight = 0.0
    assert weighted - trainer.stage_loss(model, batch).item() == pytest.approx(3.0 * drift, rel=1e-4)


def test_training_with_the_anchor_keeps_the_frozen_models_replies_closer(tiny):
    drifts = {}
    for weight in (0.0, 50.0):
        trainer, model, frozen, batch = _trainer(tiny, weight)
        probe = trainer if weight else _trainer(tiny, 1.0)[0]  # weight 0 keeps no replies: measure with another
        train_loss(trainer, model, batch)
        drifts[weight] = _anchor_drift(model, frozen, probe, batch)
    assert drifts[0.0] > 1e-4  # the fit alone moves the model along its own replies
    assert drifts[50.0] < 0.2 * drifts[0.0]


def test_anchor_weight_is_checked_and_old_runs_resume_without_it(tiny):
    with pytest.raises(ConfigError, match="fit.anchor_weight must be a number >= 0, got -2"):
        load_config(None, [f"model={tiny}", "fit.anchor_weight=-2"])
    config = load_config(None, [f"model={tiny}"])
    saved = {"fit": {"kl_weight": 0.0}}
    assert config.upgrade_saved(saved)["fit"]["anchor_weight"] == 0.0
    with pytest.raises(ValueError, match="max_new_tokens >= 1"):
        AnchorReplies(stop_ids=[2], pad_id=0, max_new_tokens=0)


def test_held_out_anchor_drift_is_measured_and_stated_on_the_card(tiny):
    from rahf.method.convergence import check_lines, measure_progress

    trainer, model, frozen, batch = _trainer(tiny, 5.0)
    trainer.model = model
    config = load_config(None, [f"model={tiny}", "method=scit", "patterns.target_layers=[1,3]", "fit.anchor_weight=5"])
    examples = fit_examples(PAIRS, tiny_tokenizer(), config)
    assert measure_progress(trainer, examples)["anchor_kl"] == pytest.approx(0.0, abs=1e-9)  # fresh adapter
    move_adapter(model)
    progress = measure_progress(trainer, examples)
    model.eval()
    assert progress["anchor_kl"] == pytest.approx(_anchor_drift(model, frozen, trainer, batch), rel=1e-3)
    lines = check_lines(config, [], {"convergence": {"examples": len(examples), "source": "validation", **progress}})
    assert any(line.startswith("On-policy anchor (fit.anchor_weight=5.0): on the frozen model's own replies") for line in lines)


def test_prefetched_replies_cover_every_prompt_the_fit_reads(tmp_path, tiny):
    """Generated ahead for the first max_steps batches of the seeded sampler, many prompts per
    call: training then generates nothing."""
    from rahf.trainer import training_arguments

    pairs = [PreferencePair(({"role": "user", "content": f"Question {i}{'?' * i}"},), f"Answer {i}.", f"No {i}.", f"t:{i}")
             for i in range(6)]
    config = load_config(None, [f"model={tiny}", "method=scit", "patterns.target_layers=[1,3]", "patterns.reply=both",
                                "fit.train.max_steps=2", "fit.train.batch_size=2", "fit.anchor_weight=1",
                                "report_to=[none]", "device=cpu"])
    tok = tiny_tokenizer()
    model, frozen = load_fit_model(config, tiny, {}, [1, 3])
    examples = fit_examples(pairs, tok, config)
    trainer = FitTrainer(model=model, args=training_arguments(config, config.fit.train, tmp_path / "out", stage="fit"),
                         train_dataset=examples, data_collator=FitCollator(tok.pad_token_id))
    trainer.setup_fit(layers=[1, 3], alpha=1.0, source=pattern_source(config), frozen=frozen, pad_id=tok.pad_token_id,
                      truncate=True, batch_frozen=True, kl_weight=0.0, stop_ids=stop_token_ids(model, tok),
                      anchor_weight=1.0, anchor_tokens=4, group_by_length=True)
    with mock.patch.object(anchor_module, "continue_batch", wraps=anchor_module.continue_batch) as generate:
        assert trainer.prefetch_anchors(examples) == 2  # 2 steps x 2 examples = 2 pairs, one prompt each
        assert generate.call_count == 1
        trainer.train()
        assert generate.call_count == 1  # every prompt the steps read was there
    assert len(trainer.anchors.replies) == 2
