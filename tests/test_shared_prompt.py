"""A prompt that rows of a batch share goes through a model once (issue #15), with the same result.

Dual fits both replies of a pair (``patterns.reply: both``): the prompt is run once per model and
each reply continues from its keys and values. Reply-token states, gradients, cached targets and
a trained adapter equal the one-call path's within 1e-5 (fp32), with padding on both sides.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rahf.config import load_config
from rahf.data.schema import PreferencePair
from rahf.hidden_states import (
    reply_hidden_states,
    reply_hidden_states_shared,
    reply_mask,
    shared_prompts,
)
from rahf.method.fit import (
    FitCollator,
    FitTrainer,
    compute_cache,
    fitting_loss,
    load_fit_model,
    pair_units,
    unit_order,
)
from rahf.method.patterns import fit_examples, frozen_patterns, pattern_source
from rahf.method.targets import TargetCache
from rahf.testing import save_step1_adapters, save_tiny, tiny_model, tiny_tokenizer
from rahf.trainer import training_arguments

LAYERS = [1, 3]
WORDS = "boil the egg for nine minutes then cool it in cold water and peel".split()


def _batch(prompts: list[list[int]], rows: list[tuple[int, list[int]]], *, extra: int = 3, left: int = 0) -> dict:
    """Rows ``(prompt index, reply ids)``: right-padded by ``extra`` columns past the longest row;
    with ``left``, every prompt is left-padded to ``left`` tokens (the reference layout)."""
    seqs = [([0] * (left - len(prompts[p])) if left else []) + prompts[p] + reply for p, reply in rows]
    starts = [left or len(prompts[p]) for p, _ in rows]
    width = max(len(s) for s in seqs) + extra
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, ((p, _), seq) in enumerate(zip(rows, seqs, strict=True)):
        ids[b, : len(seq)] = torch.tensor(seq)
        mask[b, len(seq) - len(prompts[p]) - len(rows[b][1]) : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "reply_start": torch.tensor(starts),
            "reply_len": torch.tensor([len(r) for _, r in rows])}


def _random_batch(seed: int = 0, *, left: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(3, 300, (n,), generator=g).tolist()

    prompts = [ids(n) for n in (5, 11, 2, 7)]
    # Rows sharing a prompt sit apart; one prompt is used once, one three times; a reply of 1 token.
    rows = [(0, ids(4)), (1, ids(9)), (0, ids(1)), (2, ids(6)), (1, ids(3)), (3, ids(5)), (2, ids(2)), (2, ids(8))]
    return _batch(prompts, rows, left=left)


def test_shared_prompts_names_one_row_per_prompt():
    batch = _random_batch()
    firsts, owner = shared_prompts(batch)
    assert firsts.tolist() == [0, 1, 3, 5]
    assert owner.tolist() == [0, 1, 0, 2, 1, 3, 2, 2]
    distinct = _batch([[5, 6], [5, 7]], [(0, [9]), (1, [9])])  # same length, different tokens
    assert shared_prompts(distinct) is None


@pytest.mark.parametrize("truncate", [True, False])
@pytest.mark.parametrize("multiple", [1, 16])
@pytest.mark.parametrize("left", [0, 12])
def test_shared_prompt_states_equal_one_call(truncate, multiple, left):
    model = tiny_model(layers=4).eval()
    batch = _random_batch(left=left)
    with torch.no_grad():
        plain = reply_hidden_states(model, batch, LAYERS, truncate=truncate)
        shared = reply_hidden_states(model, batch, LAYERS, truncate=truncate, share_prompt=True, pad_multiple=multiple)
    mask = reply_mask(batch["reply_len"], plain.shape[2])
    assert shared.shape == plain.shape
    scale = plain[:, mask].abs().mean().item()
    assert scale > 0.005  # real states, not zeros
    difference = (shared - plain)[:, mask].abs().max().item()
    assert difference < 1e-5 and difference < 1e-3 * scale


def test_shared_prompt_gradients_equal_one_call():
    """The trained pass can share the prompt: the loss and every gradient match the one-call pass."""
    batch = _random_batch(1)
    width = int(batch["reply_len"].max())
    mask = reply_mask(batch["reply_len"], width)
    target = torch.randn(len(LAYERS), mask.shape[0], width, 32, generator=torch.Generator().manual_seed(2))
    grads, losses = {}, {}
    for share in (False, True):
        model = tiny_model(layers=4).eval()
        hidden = reply_hidden_states(model, batch, LAYERS, reply_width=width, share_prompt=share, pad_multiple=16)
        loss = fitting_loss(hidden, target, mask)
        loss.backward()
        losses[share] = loss.item()
        grads[share] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 10
    for name, grad in grads[False].items():
        assert torch.allclose(grads[True][name], grad, atol=1e-5), name


def test_shared_call_runs_each_prompt_once():
    """What the sharing saves: the prompt call has one row per distinct prompt, the reply call
    only the reply columns."""
    model = tiny_model(layers=4).eval()
    batch = _random_batch()
    shapes: list[tuple[int, int]] = []
    handle = model.model.embed_tokens.register_forward_hook(lambda _m, inputs, _o: shapes.append(tuple(inputs[0].shape)))
    try:
        with torch.no_grad():
            reply_hidden_states_shared(model, batch, LAYERS, shared_prompts(batch))
    finally:
        handle.remove()
    assert shapes == [(4, int(batch["reply_start"].max())), (8, int(batch["reply_len"].max()))]


def test_unit_order_keeps_pairs_in_one_batch():
    lengths = [(n, n) for n in (5, 40, 6, 41, 30, 31, 7, 8, 50, 3, 4, 9)]
    units = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    for grouped in (True, False):
        order = unit_order(lengths, units, 4, torch.Generator().manual_seed(0), grouped=grouped)
        assert sorted(order) == list(range(12))
        for start in range(0, 12, 2):  # each unit's two examples are adjacent, and batches of 4 hold whole units
            assert sorted(order[start : start + 2]) in units
    with pytest.raises(ValueError, match="cannot hold whole units"):
        unit_order(lengths, units, 3, torch.Generator().manual_seed(0))


# ------------------------------------------------------------------ the fit, end to end (Dual)


def _pair(i: int, prompt_words: int, reply_words: int) -> PreferencePair:
    prompt = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(prompt_words))
    chosen = " ".join(WORDS[j % len(WORDS)] for j in range(reply_words))
    return PreferencePair(({"role": "user", "content": f"Q{i}: {prompt}"},), chosen, f"No idea, {i}.", f"t:{i}")


PAIRS = [_pair(i, p, r) for i, (p, r) in enumerate([(3, 2), (20, 9), (8, 30), (2, 4), (25, 3), (12, 12)])]


@pytest.fixture(scope="module")
def dual(tmp_path_factory) -> tuple[str, dict[str, str]]:
    root = tmp_path_factory.mktemp("dual")
    tiny = str(save_tiny(root / "tiny", layers=4))
    return tiny, save_step1_adapters(tiny, root, _config(tiny).step1.lora, std=0.2)


def _config(tiny: str, *extra: str):
    return load_config(None, [
        f"model={tiny}", "method=dual", f"patterns.target_layers={LAYERS}", "device=cpu", "report_to=[none]",
        "fit.train.batch_size=4", "max_reply_tokens=48", "patterns.reply=both", "mixed_precision=no",
        "fit.lora.dropout=0", "fit.train.learning_rate=1e-2", "seed=3", *extra,
    ])


def _trainer(dual, out: Path, *extra: str, share: bool) -> tuple[FitTrainer, list]:
    tiny, step1 = dual
    config = _config(tiny, *extra)
    torch.manual_seed(0)
    model, frozen = load_fit_model(config, tiny, step1, LAYERS)
    for name, p in sorted(model.named_parameters()):  # a non-zero fitted adapter, the same in every run
        if "lora_" in name and ".default." in name:
            p.data.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    examples = fit_examples(PAIRS, tiny_tokenizer(), config)
    trainer = FitTrainer(model=model, args=training_arguments(config, config.fit.train, out, stage="fit"),
                         train_dataset=examples, data_collator=FitCollator(tiny_tokenizer().pad_token_id))
    trainer.setup_fit(layers=LAYERS, alpha=config.patterns.alpha, source=pattern_source(config), frozen=frozen,
                      pad_id=tiny_tokenizer().pad_token_id, truncate=True, batch_frozen=True, kl_weight=0.0,
                      group_by_length=config.fit.group_by_length, share_prompt=share, share_trained_prompt=share)
    return trainer, examples


def test_dual_frozen_patterns_equal_with_a_shared_prompt(dual, tmp_path):
    trainer, examples = _trainer(dual, tmp_path / "a", share=True)
    batch = FitCollator(tiny_tokenizer().pad_token_id)(examples[:6])  # three pairs
    assert shared_prompts(batch["orig"]) is not None
    out = {}
    for share in (False, True):
        out[share] = frozen_patterns(trainer.frozen, trainer.source, batch, LAYERS, pad_id=0, share_prompt=share,
                                     pad_multiple=16)
    mask = reply_mask(batch["orig"]["reply_len"], out[False]["orig"].shape[2])
    for role, states in out[False].items():
        assert (out[True][role] - states)[:, mask].abs().max().item() < 1e-5, role
    assert (out[False]["preferred"] - out[False]["dispreferred"])[:, mask].abs().max().item() > 1e-3  # sides differ


def test_dual_cached_targets_equal_with_a_shared_prompt(dual, tmp_path):
    caches = {}
    for share in (False, True):
        trainer, examples = _trainer(dual, tmp_path / f"t{share}", share=share)
        compute_cache(trainer, examples, tmp_path / f"cache{share}", batch_size=4, dtype="float32")
        caches[share] = TargetCache(tmp_path / f"cache{share}")
    assert len(caches[True]) == 2 * len(PAIRS)
    for index in range(2 * len(PAIRS)):
        assert torch.allclose(caches[True][index], caches[False][index], atol=1e-5), index


def test_dual_fit_equals_with_a_shared_prompt(dual, tmp_path):
    """Same batches (the sampler keeps pairs together either way), same losses and adapter."""
    results = {}
    for share in (False, True):
        trainer, examples = _trainer(dual, tmp_path / f"f{share}", "fit.train.epochs=2", share=share)
        batches = list(trainer.get_train_dataloader())
        for batch in batches:  # every batch holds whole pairs
            assert shared_prompts(batch["orig"]) is not None and len(shared_prompts(batch["orig"])[0]) == 2
        losses: list[float] = []
        model, stage_loss = trainer.model, trainer.stage_loss

        def recorded(model, inputs, stage_loss=stage_loss, losses=losses):
            loss = stage_loss(model, inputs)
            losses.append(loss.item())
            return loss

        trainer.stage_loss = recorded
        before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n and ".default." in n}
        trainer.train()
        adapter = {n: p.detach().clone() for n, p in model.named_parameters() if n in before}
        results[share] = losses, adapter
        assert max((adapter[n] - before[n]).abs().max().item() for n in before) > 1e-3  # it trains
    (plain_losses, plain), (shared_losses, shared) = results[False], results[True]
    assert len(plain_losses) == 6 and shared_losses == pytest.approx(plain_losses, abs=1e-5)
    for name, weight in plain.items():
        assert torch.allclose(shared[name], weight, atol=1e-5), name


def test_pair_units_only_for_whole_pairs(dual):
    tiny, _ = dual
    both = fit_examples(PAIRS, tiny_tokenizer(), _config(tiny))
    assert pair_units(both) == [[2 * i, 2 * i + 1] for i in range(len(PAIRS))]
    chosen = fit_examples(PAIRS, tiny_tokenizer(), _config(tiny, "patterns.reply=chosen"))
    assert pair_units(chosen) is None


def test_trained_pass_shares_only_when_asked_and_not_under_checkpointing(dual, tmp_path):
    """Frozen passes share by default; the trained pass only with ``share_trained_prompt`` (faster
    on long prompts, slower on short ones) and never under gradient checkpointing (no cache)."""
    trainer, _ = _trainer(dual, tmp_path / "d", share=True)
    model = trainer.model
    model.train()
    assert trainer.shares_trained_prompt(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert not trainer.shares_trained_prompt(model)
    model.gradient_checkpointing_disable()
    tiny, _ = dual
    config = _config(tiny)
    trainer.setup_fit(layers=LAYERS, alpha=config.patterns.alpha, source=pattern_source(config), frozen=trainer.frozen,
                      pad_id=0, truncate=True, batch_frozen=True, kl_weight=0.0)  # the defaults
    assert trainer.share_prompt and not trainer.shares_trained_prompt(model)


# ------------------------------------------------------------------ fit.share_prompt: the config key


def _align_with(root: Path, data: Path, tiny: Path, share: str) -> tuple[dict[str, torch.Tensor], list[dict], dict]:
    """A tiny Dual `rahf align` run in fp32 with ``fit.share_prompt=share``: the fitted adapter,
    setup_fit's keyword arguments, and how many shared-prompt calls ran with and without grad."""
    from safetensors.torch import load_file
    from shared_runs import tiny_settings

    from rahf import hidden_states
    from rahf.pipeline import align

    calls, shared_calls = [], {"trained": 0, "frozen": 0}
    setup, shared = FitTrainer.setup_fit, hidden_states.reply_hidden_states_shared

    def recorded_setup(self, **kwargs):
        calls.append(kwargs)
        return setup(self, **kwargs)

    def counted_shared(*args, **kwargs):
        shared_calls["trained" if torch.is_grad_enabled() else "frozen"] += 1
        return shared(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FitTrainer, "setup_fit", recorded_setup)
        patch.setattr(hidden_states, "reply_hidden_states_shared", counted_shared)
        align(load_config(None, tiny_settings(
            tiny, data, root / share, "method=dual", "dtype=float32", "mixed_precision=no", "fit.lora.dropout=0",
            "gradient_checkpointing=false", "fit.train.batch_size=4", f"fit.share_prompt={share}",
        )))
    return load_file(root / share / "fit" / "adapter" / "adapter_model.safetensors"), calls, shared_calls


def test_share_prompt_key_reaches_the_fit_and_keeps_the_adapter(tmp_path):
    """`fit.share_prompt` picks which passes share a prompt; every choice fits the same adapter
    (fp32, within 1e-5), and only the passes it names run the shared-prompt call."""
    from rahf.testing import save_tiny, write_toy_pairs

    tiny, data = save_tiny(tmp_path / "tiny", layers=4), write_toy_pairs(tmp_path / "pairs.jsonl", 24)
    runs = {share: _align_with(tmp_path, data, tiny, share) for share in ("frozen", "all", "off", "auto")}
    flags = {share: [(c["share_prompt"], c["share_trained_prompt"]) for c in calls] for share, (_, calls, _) in runs.items()}
    assert flags == {"frozen": [(True, False)], "all": [(True, True)], "off": [(False, False)], "auto": [(True, "auto")]}
    counts = {share: counted for share, (_, _, counted) in runs.items()}
    assert counts["frozen"]["frozen"] > 0 and counts["frozen"]["trained"] == 0
    assert counts["all"]["frozen"] > 0 and counts["all"]["trained"] >= 6  # every fit step (max_steps 6)
    assert counts["off"] == {"trained": 0, "frozen": 0}
    reference = runs["frozen"][0]
    assert len(reference) > 0 and max(w.abs().max().item() for n, w in reference.items() if "lora_B" in n) > 1e-4
    assert counts["auto"]["frozen"] > 0 and counts["auto"]["trained"] <= counts["all"]["trained"]
    for share in ("all", "off", "auto"):
        adapter = runs[share][0]
        assert adapter.keys() == reference.keys()
        for name, weight in reference.items():
            assert (adapter[name] - weight).abs().max().item() < 1e-5, (share, name)


def test_share_prompt_key_values(tmp_path):
    from rahf.config import AlignConfig, ConfigError

    assert load_config(None, []).fit.share_prompt == "auto"
    for value in ("auto", "frozen", "all", "off"):
        assert load_config(None, [f"fit.share_prompt={value}"]).fit.share_prompt == value
    written = tmp_path / "share.yaml"
    written.write_text("fit:\n  share_prompt: off\n")  # YAML 1.1 reads a bare `off` as false
    assert load_config(written).fit.share_prompt == "off"
    with pytest.raises(ConfigError, match=r"--set fit.share_prompt=trained: fit.share_prompt must be one of auto, frozen, all, off; got 'trained'"):
        load_config(None, ["fit.share_prompt=trained"])
    with pytest.raises(ConfigError, match="fit.share_prompt must be one of auto, frozen, all, off; got True"):
        load_config(None, ["fit.share_prompt=true"])
    # A run folder written before the key existed resumes as it fitted: sharing the frozen passes only.
    config = AlignConfig(run_dir=str(tmp_path / "run"))
    older = config.to_dict()
    older["fit"] = {k: v for k, v in older["fit"].items() if k != "share_prompt"}
    assert config.upgrade_saved(older)["fit"]["share_prompt"] == "frozen"
    assert {**config.upgrade_saved(older), "fit": {**older["fit"], "share_prompt": "auto"}} == config.to_dict()


def test_trained_pass_that_cannot_share_says_so(dual, tmp_path, capsys):
    """`all` with gradient checkpointing or the KL term falls back to the one-call trained pass,
    as setup_fit does, and prints one line naming why; otherwise nothing is printed."""
    tiny, _ = dual
    config = _config(tiny)
    trainer, _ = _trainer(dual, tmp_path / "n", share=True)
    capsys.readouterr()

    def setup(*, kl_weight: float = 0.0, stop_weight: float = 0.0, share_trained_prompt: bool = True) -> str:
        trainer.setup_fit(layers=LAYERS, alpha=config.patterns.alpha, source=pattern_source(config),
                          frozen=trainer.frozen, pad_id=0, truncate=True, batch_frozen=True, kl_weight=kl_weight,
                          stop_weight=stop_weight, stop_ids=[2], share_prompt=True,
                          share_trained_prompt=share_trained_prompt)
        return capsys.readouterr().out

    assert setup() == "" and setup(kl_weight=0.5, share_trained_prompt=False) == ""
    expected = ("rahf: fit: the trained pass runs each reply with its own prompt (fit.kl_weight / fit.stop_weight"
                " read the LM head at every reply token); only the frozen passes share it")
    assert setup(kl_weight=0.5).strip() == expected
    assert setup(stop_weight=0.5).strip() == expected
    _trainer(dual, tmp_path / "c", "gradient_checkpointing=true", share=True)
    out = capsys.readouterr().out
    assert out.count("rahf: fit: the trained pass runs each reply with its own prompt") == 1
    assert "(gradient checkpointing keeps no cache)" in out


def test_shared_prompt_saving_counts_the_positions_the_two_calls_skip():
    from rahf.hidden_states import shared_prompt_saving

    prompts = [list(range(1, 13)), list(range(20, 28))]  # 12 and 8 tokens
    batch = _batch(prompts, [(0, [5] * 8), (0, [6] * 6), (1, [7] * 8), (1, [8] * 5)], extra=0)
    shared = shared_prompts(batch)
    assert batch["input_ids"].shape == (4, 20)
    # two prompt rows 12 wide and four reply rows 8 wide, instead of four rows 20 wide
    assert shared_prompt_saving(batch, shared) == pytest.approx(1 - (2 * 12 + 4 * 8) / (4 * 20))
    # rounded to 16: two rows 16 wide and four 16 wide, more than the one call computes
    assert shared_prompt_saving(batch, shared, 16) == pytest.approx(1 - (2 * 16 + 4 * 16) / (4 * 20))


def test_auto_shares_the_trained_pass_only_where_it_skips_enough(dual, tmp_path):
    from rahf.hidden_states import shared_prompt_saving
    from rahf.method.fit import TRAINED_SHARE_ABOVE

    trainer, _ = _trainer(dual, tmp_path / "auto", share=True)
    trainer.share_trained_prompt = "auto"
    trainer.data_collator.pad_multiple = 1
    model = trainer.model
    model.train()
    long_prompts = [list(range(1, 41)), list(range(50, 90))]
    short_prompts = [[1, 2], [3, 4]]
    rows = [(0, [5] * 8), (0, [6] * 8), (1, [7] * 8), (1, [8] * 8)]
    long_batch, short_batch = _batch(long_prompts, rows, extra=0), _batch(short_prompts, rows, extra=0)
    assert 1 - (2 * 40 + 4 * 8) / (4 * 48) > TRAINED_SHARE_ABOVE > 1 - (2 * 2 + 4 * 8) / (4 * 10)
    assert trainer.shares_trained_prompt(model, long_batch)
    assert not trainer.shares_trained_prompt(model, short_batch)
    no_repeat = _batch(long_prompts, [(0, [5] * 8), (1, [7] * 8)], extra=0)
    assert not trainer.shares_trained_prompt(model, no_repeat)
    at_bound = _batch([list(range(1, 17)), list(range(20, 36))], [(0, [5] * 16), (0, [6] * 16), (1, [7] * 16), (1, [8] * 16)], extra=0)
    assert shared_prompt_saving(at_bound, shared_prompts(at_bound)) == TRAINED_SHARE_ABOVE  # 1 - (2*16 + 4*16) / (4*32)
    assert not trainer.shares_trained_prompt(model, at_bound)  # exactly at the bound: short-prompt batches sit there
    trainer.share_trained_prompt = True  # `all`: every batch whose prompts repeat
    assert trainer.shares_trained_prompt(model, short_batch)
