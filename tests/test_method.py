"""The method's equations and invariants on tiny inputs (docs/method.md steps 1-3)."""

from __future__ import annotations

import math

import pytest
import torch

from rahf.config import load_config
from rahf.data.render import encode
from rahf.data.schema import PreferencePair
from rahf.hidden_states import (
    capture_blocks,
    decoder_blocks,
    gather_reply,
    pad_batch,
    reply_hidden_states,
    reply_mask,
)
from rahf.method.fit import FitCollator, FitTrainer, fitting_loss, load_fit_model
from rahf.method.patterns import (
    FROZEN,
    ModelStates,
    Side,
    build_targets,
    collate_roles,
    fit_examples,
    frozen_patterns,
    pattern_replies,
    pattern_source,
)
from rahf.method.step1_scit import scit_loss
from rahf.testing import save_tiny, tiny_tokenizer
from rahf.trainer import add_lora

PAIRS = [
    PreferencePair(({"role": "user", "content": "How do I boil an egg?"},), "Boil it for nine minutes.", "No idea.", "t:1"),
    PreferencePair(({"role": "user", "content": "Say hi."},), "Hi there, nice to meet you!", "Go away.", "t:2"),
    PreferencePair(({"role": "user", "content": "Add 2 and 3."},), "2 + 3 = 5.", "It is 7.", "t:3"),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("model") / "tiny", layers=4))


def test_fitting_loss_matches_hand_computation():
    # 1 layer, 1 example, 2 reply tokens, hidden 2; the second token is padding.
    hidden = torch.tensor([[[[3.0, 4.0], [100.0, 100.0]]]])
    target = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]]]])
    mask = torch.tensor([[True, False]])
    assert fitting_loss(hidden, target, mask).item() == pytest.approx(5.0)
    # Two layers: mean over layers and tokens of the L2 norms (5 and 13, 1 and 0).
    hidden = torch.tensor([[[[3.0, 4.0], [1.0, 0.0]]], [[[5.0, 12.0], [0.0, 0.0]]]])
    target = torch.zeros_like(hidden)
    mask = torch.tensor([[True, True]])
    assert fitting_loss(hidden, target, mask).item() == pytest.approx((5 + 1 + 13 + 0) / 4)


def test_scit_loss_matches_hand_computation():
    eps = 0.2
    lm, ls = -1.5, -2.5  # mean log-likelihoods under the matching / swapped instruction
    p, q = math.exp(lm), math.exp(ls)
    expected = -lm - (1 - eps) * math.log(p / (p + q)) - eps * math.log(q / (p + q))
    got = scit_loss(torch.tensor([lm]), torch.tensor([ls]), eps)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_targets_follow_the_formula():
    a = {role: torch.randn(2, 1, 3, 4) for role in ("orig", "preferred", "dispreferred")}
    expected = a["orig"] + 5 * (a["preferred"] - a["dispreferred"])
    assert torch.allclose(build_targets(a, 5.0), expected)
    same = {"orig": a["orig"], "preferred": a["preferred"], "dispreferred": a["preferred"]}
    assert torch.equal(build_targets(same, 5.0), a["orig"])  # identical sides: zero pattern


def test_reply_alignment_across_instruction_lengths(tiny):
    """Row t of every pattern is reply token t, whatever the instruction length."""
    from rahf.models import load_model

    model = load_model(tiny, device="cpu").eval()
    tok = tiny_tokenizer()
    short = encode(tok, PAIRS[0].prompt, PAIRS[0].chosen, instruction=None)
    long = encode(tok, PAIRS[0].prompt, PAIRS[0].chosen, instruction="A much longer instruction " * 3)
    assert short.reply_ids == long.reply_ids and len(long.prompt_ids) > len(short.prompt_ids)
    batch = pad_batch([short, long], tok.pad_token_id)
    with torch.no_grad():
        got = reply_hidden_states(model, batch, [2], truncate=False)[0]  # (batch, reply, hidden)
        with capture_blocks(model, [2]) as cap:
            model(input_ids=torch.tensor([long.input_ids]))
    manual = cap[2][0, len(long.prompt_ids) : len(long.prompt_ids) + len(long.reply_ids)]
    assert torch.allclose(got[1], manual, atol=1e-6)
    # Reply tokens read from the batch are the reply itself.
    ids = gather_reply(batch["input_ids"][..., None].float(), batch["reply_start"], len(short.reply_ids))[..., 0]
    assert ids.long().tolist() == [short.reply_ids, long.reply_ids]


def test_padding_does_not_change_the_loss(tiny):
    """The same example alone and padded next to a longer one gives the same loss."""
    from rahf.models import load_model

    model = load_model(tiny, device="cpu").eval()
    tok = tiny_tokenizer()
    a = encode(tok, PAIRS[1].prompt, PAIRS[1].chosen)
    b = encode(tok, PAIRS[0].prompt, "A much longer reply " * 6)
    layers = [1, 3]
    target_alone = torch.randn(len(layers), 1, len(a.reply_ids), 32)
    alone = pad_batch([a], tok.pad_token_id)
    both = pad_batch([a, b], tok.pad_token_id)
    width = int(both["reply_len"].max())
    with torch.no_grad():
        loss_alone = fitting_loss(reply_hidden_states(model, alone, layers), target_alone, reply_mask(alone["reply_len"], len(a.reply_ids)))
        h_both = reply_hidden_states(model, both, layers)[:, :1]
    padded_target = torch.zeros(len(layers), 1, width, 32)
    padded_target[:, :, : len(a.reply_ids)] = target_alone
    loss_both = fitting_loss(h_both, padded_target, reply_mask(both["reply_len"][:1], width))
    assert loss_both.item() == pytest.approx(loss_alone.item(), abs=1e-5)


def test_lora_only_below_highest_target_layer(tiny):
    config = load_config(None, [f"model={tiny}", "method=scit", "patterns.target_layers=[1,2]"])
    from rahf.models import load_model

    model = add_lora(load_model(tiny, device="cpu"), config.fit.lora, blocks=range(2))
    blocks = decoder_blocks(model)
    touched = {i for i, block in enumerate(blocks) for name, _ in block.named_parameters() if "lora_" in name}
    assert touched == {0, 1}  # hidden_states[2] is the output of block 1


def _fit_setup(tiny, overrides):
    config = load_config(None, [f"model={tiny}", "method=scit", "patterns.target_layers=[1,3]", *overrides])
    tok = tiny_tokenizer()
    torch.manual_seed(0)  # the same LoRA initialisation in every call
    model, frozen = load_fit_model(config, tiny, {}, [1, 3])
    examples = fit_examples(PAIRS, tok, config)
    return config, tok, model, frozen, examples


def _loss(tiny, overrides, *, truncate=True, batch_frozen=True):
    config, tok, model, frozen, examples = _fit_setup(tiny, overrides)
    trainer = FitTrainer.__new__(FitTrainer)  # only the loss, no training loop
    trainer.setup_fit(
        layers=[1, 3], alpha=config.patterns.alpha, source=pattern_source(config), frozen=frozen,
        pad_id=tok.pad_token_id, truncate=truncate, batch_frozen=batch_frozen, kl_weight=0.0,
    )
    # Give the adapter non-zero weights so the trained model differs from the frozen one.
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    model.eval()
    return trainer.stage_loss(model, FitCollator(tok.pad_token_id)(examples))


def test_alpha_zero_and_fresh_lora_give_zero_loss(tiny):
    config, tok, model, frozen, examples = _fit_setup(tiny, ["patterns.alpha=0"])
    trainer = FitTrainer.__new__(FitTrainer)
    trainer.setup_fit(layers=[1, 3], alpha=0.0, source=pattern_source(config), frozen=frozen,
                      pad_id=tok.pad_token_id, truncate=True, batch_frozen=True, kl_weight=0.0)
    model.eval()
    assert trainer.stage_loss(model, FitCollator(tok.pad_token_id)(examples)).item() == pytest.approx(0.0, abs=1e-6)


def test_truncated_forward_leaves_loss_unchanged(tiny):
    full = _loss(tiny, [], truncate=False)
    cut = _loss(tiny, [], truncate=True)
    assert cut.item() == pytest.approx(full.item(), abs=1e-5)


def test_batched_frozen_passes_leave_loss_unchanged(tiny):
    one_call = _loss(tiny, [], batch_frozen=True)
    separate = _loss(tiny, [], batch_frozen=False)
    assert one_call.item() == pytest.approx(separate.item(), abs=1e-5)


def test_frozen_state_is_not_moved_by_training(tiny):
    """SCIT frozen passes use the weights under the fitted adapter, whatever it has learnt."""
    config, tok, model, frozen, examples = _fit_setup(tiny, [])
    batches = collate_roles(examples, tok.pad_token_id)
    passes = pattern_source(config)
    before = frozen_patterns(frozen, passes, batches, [1, 3], pad_id=tok.pad_token_id)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 1.0)
    after = frozen_patterns(frozen, passes, batches, [1, 3], pad_id=tok.pad_token_id)
    for role in before:
        assert torch.allclose(before[role], after[role], atol=1e-6)


def test_pattern_reply_choice():
    assert [r for _, r in pattern_replies(PAIRS, "both", 0)] == [
        PAIRS[0].chosen, PAIRS[0].rejected, PAIRS[1].chosen, PAIRS[1].rejected, PAIRS[2].chosen, PAIRS[2].rejected
    ]
    assert [r for _, r in pattern_replies(PAIRS, "rejected", 0)] == [p.rejected for p in PAIRS]
    first = pattern_replies(PAIRS * 20, "random", 3)
    assert first == pattern_replies(PAIRS * 20, "random", 3)  # seeded
    chosen_share = sum(r == p.chosen for p, r in first) / len(first)
    assert 0.2 < chosen_share < 0.8


def test_dual_passes_use_adapters_and_scit_passes_use_instructions():
    config = load_config(None, ["method=dual"])
    assert pattern_source(config)["preferred"] == Side("preferred", None)
    assert pattern_source(config)["orig"] == Side(FROZEN, None)
    config = load_config(None, ["method=scit"])
    passes = pattern_source(config)
    assert {p.state for p in passes.roles().values()} == {FROZEN}
    assert passes["preferred"].instruction == config.preferred_instruction
    assert passes["orig"].instruction is None


def test_frozen_models_switch_adapters_and_restore(tiny):
    from rahf.models import load_model

    model = load_model(tiny, device="cpu")
    lora = load_config(None, []).fit.lora
    model = add_lora(model, lora, name="preferred")
    model = add_lora(model, lora, name="default")
    frozen = ModelStates(model)
    with frozen.state("preferred") as m:
        assert m.active_adapter == "preferred"
    assert model.active_adapter == "default"
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n and ".default." in n)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".preferred." in n)
