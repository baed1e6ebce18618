"""fit.stop_weight: the fit keeps the frozen model's end-or-continue choice (length control)."""

from __future__ import annotations

import math

import pytest
import torch
from fit_terms import PAIRS, loss_only_trainer, move_adapter, tiny_fixture, train_loss  # noqa: F401  (fixture)

from rahf.config import ConfigError, load_config
from rahf.hidden_states import capture_blocks, gather_reply, logits_at, predicting_mask, reply_mask
from rahf.method.fit import (
    FitCollator,
    FitTrainer,
    fitting_loss,
    load_fit_model,
    next_token_kl,
    stop_kl,
    stop_log_probs,
)
from rahf.method.patterns import FROZEN, fit_examples, pattern_source
from rahf.models import stop_token_ids
from rahf.testing import tiny_tokenizer


def test_stop_log_probs_sum_the_stop_tokens():
    # Probabilities 1/8, 3/8, 1/8, 3/8 over four tokens; tokens 1 and 2 end the reply: 1/2 stop.
    logits = torch.log(torch.tensor([[1.0, 3.0, 1.0, 3.0], [1.0, 1.0, 6.0, 2.0]]))
    got = stop_log_probs(logits, [1, 2]).exp()
    assert torch.allclose(got, torch.tensor([[0.5, 0.5], [0.7, 0.3]]), atol=1e-6)


def test_stop_kl_is_the_two_way_kl_and_ignores_what_is_said():
    frozen = torch.log(torch.tensor([[0.2, 0.3, 0.5]]))  # token 0 ends the reply: p = 0.2
    trained = torch.log(torch.tensor([[0.4, 0.1, 0.5]]))  # q = 0.4
    expected = 0.2 * math.log(0.2 / 0.4) + 0.8 * math.log(0.8 / 0.6)
    assert stop_kl(frozen, trained, [0]).item() == pytest.approx(expected, rel=1e-5)
    # The same stop probability with the rest moved: the next-token KL sees it, the stop term does not.
    moved = torch.log(torch.tensor([[0.2, 0.7, 0.1]]))
    assert next_token_kl(frozen, moved).item() > 0.1
    assert stop_kl(frozen, moved, [0]).item() == pytest.approx(0.0, abs=1e-7)


def test_next_token_kl_is_the_mean_over_reply_tokens():
    frozen = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    trained = torch.log(torch.tensor([[0.25, 0.75], [0.9, 0.1]]))
    first = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert next_token_kl(frozen, trained).item() == pytest.approx(first / 2, rel=1e-5)


def _trainer(tiny, stop_weight: float, kl_weight: float = 0.0):
    return loss_only_trainer(tiny, kl_weight=kl_weight, stop_weight=stop_weight)


def _stop_drift(model, frozen, batch, stop_ids) -> float:
    """The stop term's value, computed apart from the trainer: trained vs adapter-off logits."""
    orig = batch["orig"]
    keep = predicting_mask(orig["reply_start"], orig["reply_len"], orig["input_ids"].shape[1])
    with torch.no_grad():
        trained = logits_at(model, orig, keep)
        with frozen.state(FROZEN) as base:
            before = logits_at(base, orig, keep)
    return stop_kl(before, trained, stop_ids).item()


@pytest.mark.parametrize("term", ["stop", "kl"])
def test_next_token_terms_add_their_weight_times_their_kl(tiny, term):
    trainer, model, frozen, batch = _trainer(tiny, 3.0 if term == "stop" else 0.0, 3.0 if term == "kl" else 0.0)
    move_adapter(model)
    model.eval()
    orig = batch["orig"]
    keep = predicting_mask(orig["reply_start"], orig["reply_len"], orig["input_ids"].shape[1])
    with torch.no_grad():  # both distributions computed apart from the trainer
        trained = logits_at(model, orig, keep)
        with frozen.state(FROZEN) as base:
            before = logits_at(base, orig, keep)
    drift = stop_kl(before, trained, trainer.stop_ids) if term == "stop" else next_token_kl(before, trained)
    assert drift.item() > 1e-6
    weighted = trainer.stage_loss(model, batch).item()
    trainer.stop_weight = trainer.kl_weight = 0.0
    assert weighted - trainer.stage_loss(model, batch).item() == pytest.approx(3.0 * drift.item(), rel=1e-4)


def test_training_with_the_stop_term_keeps_the_stop_probability_closer(tiny):
    # The random tiny model's next-token distribution is near uniform: a sharper head (shared by
    # the trained and the frozen passes) lets its stop probability move, here on its EOS token.
    drifts = {}
    for weight in (0.0, 50.0):
        trainer, model, frozen, batch = _trainer(tiny, weight)
        model.get_output_embeddings().weight.data *= 40
        train_loss(trainer, model, batch)
        drifts[weight] = _stop_drift(model, frozen, batch, trainer.stop_ids)
    assert drifts[0.0] > 1e-4  # the fit alone moves when the model stops
    assert drifts[50.0] < 0.2 * drifts[0.0]


def test_stop_weight_is_checked(tiny):
    with pytest.raises(ConfigError, match="fit.stop_weight must be a number >= 0, got -1"):
        load_config(None, [f"model={tiny}", "fit.stop_weight=-1"])
    trainer, *_ = _trainer(tiny, 0.0)
    with pytest.raises(ValueError, match="fit.stop_weight needs the tokens that end a reply"):
        trainer.setup_fit(layers=[1, 3], alpha=1.0, source=trainer.source, frozen=trainer.frozen, pad_id=0,
                          truncate=True, batch_frozen=True, kl_weight=0.0, stop_weight=1.0, stop_ids=())


def test_frozen_logits_of_a_step1_adapter_carry_no_dropout(tmp_path, tiny):
    """Where A_o comes from a step-1 adapter (a pattern source whose ``orig`` side names one),
    the stop term's frozen pass runs that adapter with its LoRA dropout off, even while the fit
    trains. (rahf's own sources take A_o from the weights under the fitted adapter.)"""
    from rahf.method.patterns import PatternSource, Side
    from rahf.testing import save_step1_adapters

    config = load_config(None, [f"model={tiny}", "method=dual", "patterns.target_layers=[1,3]", "fit.lora.dropout=0",
                                "step1.lora.dropout=0.5"])
    step1 = save_step1_adapters(tiny, tmp_path, config.step1.lora, std=0.5)
    model, frozen = load_fit_model(config, tiny, step1, [1, 3])
    assert model.peft_config["preferred"].lora_dropout == 0.5
    tok = tiny_tokenizer()
    trainer = FitTrainer.__new__(FitTrainer)
    source = PatternSource("dual", Side("preferred", None), Side("preferred", None), Side("dispreferred", None))
    trainer.setup_fit(layers=[1, 3], alpha=1.0, source=source, frozen=frozen, pad_id=tok.pad_token_id,
                      truncate=True, batch_frozen=True, kl_weight=0.0, stop_weight=10.0, stop_ids=stop_token_ids(model, tok))
    batch = FitCollator(tok.pad_token_id)(fit_examples(PAIRS, tok, config))
    model.train()
    losses = [trainer.stage_loss(model, batch).item() for _ in range(3)]
    assert losses[0] == losses[1] == losses[2]
    assert model.training  # the frozen pass gave the training mode back


def test_held_out_stop_drift_is_measured_and_stated_on_the_card(tiny):
    from rahf.method.convergence import check_lines, measure_progress

    trainer, model, frozen, batch = _trainer(tiny, 5.0)
    trainer.model = model
    config = load_config(None, [f"model={tiny}", "method=scit", "patterns.target_layers=[1,3]", "fit.stop_weight=5"])
    examples = fit_examples(PAIRS, tiny_tokenizer(), config)
    assert measure_progress(trainer, examples)["stop_kl"] == pytest.approx(0.0, abs=1e-9)  # fresh adapter
    move_adapter(model)
    progress = measure_progress(trainer, examples)
    model.eval()  # as the measurement runs: no LoRA dropout
    assert progress["stop_kl"] == pytest.approx(_stop_drift(model, frozen, batch, trainer.stop_ids), rel=1e-3)
    lines = check_lines(config, [], {"convergence": {"examples": len(examples), "source": "validation", **progress}})
    assert any(line.startswith("Length control (fit.stop_weight=5.0): the end-or-continue choice moved") for line in lines)
    trainer.stop_weight = 0.0
    assert "stop_kl" not in measure_progress(trainer, examples)


@pytest.mark.parametrize("method", ["scit", "dual"])
def test_next_token_terms_run_the_frozen_start_model_once(tmp_path, tiny, method):
    """With the next-token terms on, A_o's model runs once per step, to the LM head, and A_o is
    captured on the way: the same loss as a truncated pattern pass plus a separate logits pass."""
    from rahf.method.patterns import build_targets, frozen_patterns
    from rahf.testing import save_step1_adapters

    config = load_config(None, [f"model={tiny}", f"method={method}", "patterns.target_layers=[1,3]", "fit.lora.dropout=0",
                                "patterns.reply=both"])
    step1 = save_step1_adapters(tiny, tmp_path, config.step1.lora, std=0.5) if method == "dual" else {}
    model, frozen = load_fit_model(config, tiny, step1, [1, 3])
    tok = tiny_tokenizer()
    trainer = FitTrainer.__new__(FitTrainer)
    source = pattern_source(config)
    trainer.setup_fit(layers=[1, 3], alpha=2.0, source=source, frozen=frozen, pad_id=tok.pad_token_id, truncate=True,
                      batch_frozen=True, kl_weight=2.0, stop_weight=5.0, stop_ids=stop_token_ids(model, tok))
    batch = FitCollator(tok.pad_token_id)(fit_examples(PAIRS, tok, config))
    move_adapter(model, "default")  # the fitted adapter moves the model
    model.eval()
    entered = []
    state = frozen.state
    with torch.no_grad():
        frozen.state = lambda name: entered.append(name) or state(name)
        loss = trainer.stage_loss(model, batch).item()
        frozen.state = state
    assert entered.count(source.orig.state) == (1 if method == "dual" else 2)  # SCIT: its other roles share that state
    orig = batch["orig"]  # the same loss computed the long way, as before the change
    keep = predicting_mask(orig["reply_start"], orig["reply_len"], orig["input_ids"].shape[1])
    with torch.no_grad():
        target = build_targets(frozen_patterns(frozen, source, batch, [1, 3], pad_id=tok.pad_token_id), 2.0)
        before = trainer.frozen_logits(orig, keep)
        with capture_blocks(model, [1, 3]) as captured:
            trained = logits_at(model, orig, keep)
        width = int(orig["reply_len"].max())
        hidden = torch.stack([gather_reply(captured[layer], orig["reply_start"], width) for layer in [1, 3]])
        expected = (fitting_loss(hidden, target, reply_mask(orig["reply_len"], width))
                    + 2.0 * next_token_kl(before, trained) + 5.0 * stop_kl(before, trained, trainer.stop_ids))
    assert loss == pytest.approx(expected.item(), rel=1e-5)
