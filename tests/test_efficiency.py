"""Each efficiency optimisation leaves the fitting loss of a fixed batch unchanged (fp32).

Covered elsewhere, not repeated here (tests/test_method.py):
- truncated forward: ``test_truncated_forward_leaves_loss_unchanged``;
- batched frozen passes: ``test_batched_frozen_passes_leave_loss_unchanged``.
Here: cached targets (float32 exact, bf16 close), Dual step-1 adapters vs merged full copies,
length-grouped batching, and a cache that fails its integrity checks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rahf.config import load_config
from rahf.data.schema import PreferencePair
from rahf.hidden_states import reply_hidden_states, reply_mask
from rahf.method.fit import (
    FitCollator,
    FitTrainer,
    compute_cache,
    example_length,
    fitting_loss,
    length_grouped_order,
    load_fit_model,
)
from rahf.method.patterns import fit_examples, pattern_source
from rahf.method.targets import CacheError, TargetCache
from rahf.models import load_model
from rahf.testing import save_tiny, tiny_tokenizer
from rahf.trainer import add_lora, training_arguments

LAYERS = [1, 3]
WORDS = "boil the egg for nine minutes then cool it in cold water and peel".split()


def _pair(i: int, reply_words: int) -> PreferencePair:
    prompt = ({"role": "user", "content": f"Question {i}: how do I boil an egg?"},)
    chosen = " ".join(WORDS[j % len(WORDS)] for j in range(reply_words))
    return PreferencePair(prompt, chosen, f"No idea, {i}.", f"t:{i}")


# Skewed lengths: many short replies, a few long ones.
PAIRS = [_pair(i, n) for i, n in enumerate([2, 3, 40, 2, 4, 35, 3, 2, 30, 5, 2, 3])]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(save_tiny(tmp_path_factory.mktemp("model") / "tiny", layers=4))


def _config(tiny: str, method: str, *extra: str):
    return load_config(None, [
        f"model={tiny}", f"method={method}", f"patterns.target_layers={LAYERS}", "device=cpu",
        "fit.train.batch_size=4", "report_to=[none]", "max_reply_tokens=48", "patterns.reply=chosen",
        "mixed_precision=no",  # equivalence within 1e-5 is an fp32 claim; bf16 has its own tests below
        *extra,
    ])


def _set_fit_lora(model: torch.nn.Module, seed: int = 1) -> None:
    """Same non-zero weights for the fitted adapter whatever else was loaded (RNG-independent)."""
    generator = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if "lora_" in name and ".default." in name:
            p.data.copy_(torch.randn(p.shape, generator=generator) * 0.1)


def _trainer(config, model, frozen, examples, out: Path, *, group_by_length: bool = False) -> FitTrainer:
    tok = tiny_tokenizer()
    trainer = FitTrainer(
        model=model,
        args=training_arguments(config, config.fit.train, out, stage="fit"),
        train_dataset=examples,
        data_collator=FitCollator(tok.pad_token_id),
    )
    trainer.setup_fit(
        layers=LAYERS, alpha=config.patterns.alpha, source=pattern_source(config), frozen=frozen,
        pad_id=tok.pad_token_id, truncate=True, batch_frozen=True, kl_weight=0.0,
        group_by_length=group_by_length,
    )
    return trainer


def _setup(tiny: str, method: str, tmp_path: Path, *extra: str, step1: dict | None = None):
    config = _config(tiny, method, *extra)
    model, frozen = load_fit_model(config, tiny, step1 or {}, LAYERS)
    _set_fit_lora(model)
    model.eval()  # no LoRA dropout: the same loss on every call
    examples = fit_examples(PAIRS, tiny_tokenizer(), config)
    return config, model, frozen, examples, _trainer(config, model, frozen, examples, tmp_path / "ckpt")


def _per_example_losses(trainer: FitTrainer, model, batch: dict) -> torch.Tensor:
    """Fitting loss of each example of a batch on its own (its layers and reply tokens only)."""
    with torch.no_grad():
        orig = batch["orig"]
        width = int(orig["reply_len"].max())
        target = trainer.targets(batch)
        hidden = reply_hidden_states(model, orig, LAYERS, reply_width=width)
        mask = reply_mask(orig["reply_len"], width)
        return torch.stack([fitting_loss(hidden[:, b : b + 1], target[:, b : b + 1], mask[b : b + 1]) for b in range(mask.shape[0])])


def test_cached_float32_targets_equal_on_the_fly(tiny, tmp_path):
    config, model, frozen, examples, trainer = _setup(tiny, "scit", tmp_path, "fit.cache_dtype=float32")
    pad = tiny_tokenizer().pad_token_id
    batch = FitCollator(pad)(examples[:5])
    compute_cache(trainer, examples, tmp_path / "cache", batch_size=3, dtype=config.fit.cache_dtype)
    cache = TargetCache(tmp_path / "cache")
    assert cache.dtype == "float32"
    cached_batch = FitCollator(pad, cache)(examples[:5])
    assert "preferred" not in cached_batch  # the frozen passes are skipped
    with torch.no_grad():
        live = trainer.stage_loss(model, batch)
        cached = trainer.stage_loss(model, cached_batch)
    assert cached.item() == pytest.approx(live.item(), abs=1e-5)


def test_cached_bf16_targets_are_close(tiny, tmp_path):
    """bf16 rounds each target value by at most 2**-9 of its size (8 significant bits), so the
    loss (a mean of L2 distances) moves by at most 2**-9 * mean ||T||; we allow twice that."""
    config, model, frozen, examples, trainer = _setup(tiny, "scit", tmp_path)
    assert config.fit.cache_dtype == "bfloat16"  # the default
    pad = tiny_tokenizer().pad_token_id
    compute_cache(trainer, examples, tmp_path / "cache", batch_size=4)
    cache = TargetCache(tmp_path / "cache")
    assert cache.dtype == "bfloat16"
    batch = FitCollator(pad)(examples)
    with torch.no_grad():
        target = trainer.targets(batch)
        mask = reply_mask(batch["orig"]["reply_len"], target.shape[2])
        mean_norm = (target.norm(dim=-1) * mask).sum() / (mask.sum() * len(LAYERS))
        live = trainer.stage_loss(model, batch)
        cached = trainer.stage_loss(model, FitCollator(pad, cache)(examples))
    assert abs(cached.item() - live.item()) <= 2**-8 * mean_norm.item()
    assert cached.item() != live.item()  # bf16 did round something


def _write_step1(tiny: str, folder: Path, config, seed: int) -> str:
    """A Dual step-1 output (adapter/ and merged/) with random non-zero LoRA weights."""
    torch.manual_seed(seed)
    model = add_lora(load_model(tiny, device="cpu"), config.step1.lora)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.2)
    model.save_pretrained(folder / "adapter")
    model.merge_and_unload().save_pretrained(folder / "merged")
    return str(folder)


def test_dual_adapters_equal_full_copies(tiny, tmp_path):
    """Frozen passes through step-1 adapters on one base == through the same adapters merged."""
    config = _config(tiny, "dual")
    step1 = {side: _write_step1(tiny, tmp_path / side, config, seed) for seed, side in enumerate(("preferred", "dispreferred"))}
    losses = {}
    for storage in ("adapters", "full-copies"):
        cfg, model, frozen, examples, trainer = _setup(tiny, "dual", tmp_path, f"step1.dual_storage={storage}", step1=step1)
        assert bool(frozen.copies) == (storage == "full-copies")
        batch = FitCollator(tiny_tokenizer().pad_token_id)(examples[:6])
        with torch.no_grad():
            losses[storage] = trainer.stage_loss(model, batch).item()
    assert losses["adapters"] == pytest.approx(losses["full-copies"], abs=1e-5)
    assert losses["adapters"] > 0


def test_group_by_length_keeps_per_example_losses_and_pads_less(tiny, tmp_path):
    config, model, frozen, examples, _ = _setup(tiny, "scit", tmp_path)
    grouped = _trainer(config, model, frozen, examples, tmp_path / "g", group_by_length=True)
    plain = _trainer(config, model, frozen, examples, tmp_path / "p", group_by_length=False)

    def batches(trainer: FitTrainer) -> list[dict]:
        return list(trainer.get_train_dataloader())

    def padding(batch_list: list[dict]) -> int:
        return sum(int((b["orig"]["attention_mask"] == 0).sum()) for b in batch_list)

    grouped_batches, plain_batches = batches(grouped), batches(plain)
    # Same examples, different batching: the per-example losses add up to the same total.
    total = {name: sum(_per_example_losses(grouped, model, b).sum().item() for b in bs)
             for name, bs in (("grouped", grouped_batches), ("plain", plain_batches))}
    assert total["grouped"] == pytest.approx(total["plain"], abs=1e-5)
    # Fewer padding tokens on this skewed set than a random order, and than sequential order.
    sequential = [FitCollator(tiny_tokenizer().pad_token_id)(examples[i : i + 4]) for i in range(0, len(examples), 4)]
    assert padding(grouped_batches) < padding(plain_batches)
    assert padding(grouped_batches) < padding(sequential)


def test_length_grouped_order_is_seeded_and_groups_lengths():
    lengths = [5, 100, 6, 99, 7, 98, 8, 97, 50, 51, 52, 4]
    first = length_grouped_order(lengths, 4, torch.Generator().manual_seed(0))
    assert first == length_grouped_order(lengths, 4, torch.Generator().manual_seed(0))
    assert sorted(first) == list(range(len(lengths)))  # a permutation: every example once
    groups = [sorted(lengths[i] for i in first[g : g + 4]) for g in range(0, len(first), 4)]
    assert sorted(groups) == [[4, 5, 6, 7], [8, 50, 51, 52], [97, 98, 99, 100]]
    assert max(lengths[i] for i in first[:4]) == 100  # longest batch first: out-of-memory fails early
    orders = {tuple(length_grouped_order(lengths, 4, torch.Generator().manual_seed(s))) for s in range(6)}
    assert len(orders) > 1  # the order still varies with the seed (epoch)


def test_example_length_is_the_longest_role(tiny):
    config = _config(tiny, "scit")
    example = fit_examples(PAIRS[:1], tiny_tokenizer(), config)[0]
    assert example_length(example) == max(len(e.input_ids) for e in example.inputs.values())
    assert example_length(example) > len(example.inputs["orig"].input_ids)  # the instruction adds tokens


def _small_cache(folder: Path, dtype: str = "bfloat16") -> Path:
    from rahf.method.targets import write_cache

    targets = torch.randn(2, 3, 5, 8)  # (layers, batch, reply, hidden)
    write_cache(folder, [([0, 1, 2], targets, torch.tensor([5, 2, 4]))], layers=2, hidden=8, dtype=dtype)
    return folder


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cache_round_trip_per_dtype(tmp_path, dtype):
    from rahf.method.targets import write_cache

    targets = torch.randn(2, 3, 5, 8)
    write_cache(tmp_path, [([7, 8, 9], targets, torch.tensor([5, 2, 4]))], layers=2, hidden=8, dtype=dtype)
    cache = TargetCache(tmp_path)
    assert cache.dtype == dtype and len(cache) == 3
    got = cache.batch([8, 7], 5)  # (layers, batch, width, hidden), zero past each reply
    tol = 0 if dtype == "float32" else 2**-8
    assert torch.allclose(got[:, 1], targets[:, 0], rtol=tol, atol=0)
    assert torch.allclose(got[:, 0, :2], targets[:, 1, :2], rtol=tol, atol=0)
    assert not got[:, 0, 2:].any()
    size = (tmp_path / "targets.bin").stat().st_size
    assert size == 2 * (5 + 2 + 4) * 8 * (4 if dtype == "float32" else 2)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_corrupted_cache_is_refused_naming_the_file(tmp_path, dtype):
    folder = _small_cache(tmp_path / "flip", dtype)
    data = bytearray((folder / "targets.bin").read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / "targets.bin").write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"targets\.bin.*checksum"):
        TargetCache(folder)

    folder = _small_cache(tmp_path / "cut", dtype)
    data = (folder / "targets.bin").read_bytes()
    (folder / "targets.bin").write_bytes(data[:-2])
    with pytest.raises(CacheError, match=r"targets\.bin.*truncated"):
        TargetCache(folder)


def test_old_index_without_dtype_reads_as_bf16(tmp_path):
    import json

    folder = _small_cache(tmp_path)
    index = json.loads((folder / "index.json").read_text())
    del index["dtype"]
    (folder / "index.json").write_text(json.dumps(index))
    assert TargetCache(folder).dtype == "bfloat16"


# ------------------------------------------------------------------ bf16 autocast (the default where native)


@pytest.mark.parametrize(("mixed", "dtype", "native", "expected"), [
    ("auto", "auto", True, True),  # this CPU kind: AVX-512 BF16 / AMX
    ("auto", "auto", False, False),  # emulated bf16 would only cost time
    ("auto", "float32", True, False),  # asking for fp32 weights means fp32 compute
    ("no", "auto", True, False),
    ("bf16", "auto", False, True),
])
def test_bf16_autocast_by_default_where_the_cpu_has_it(monkeypatch, tiny, mixed, dtype, native, expected):
    from rahf import trainer

    monkeypatch.setattr(trainer.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: native)
    config = load_config(None, [f"model={tiny}", f"mixed_precision={mixed}", f"dtype={dtype}"])
    assert trainer.use_bf16(config) is expected
    assert training_arguments(config, config.fit.train, Path("unused"), stage="fit").bf16 is expected


def _fresh_bf16_setup(tiny: str, tmp_path: Path, *extra: str):
    """bf16 autocast, alpha 0 and a fresh adapter (B = 0): the targets are exactly what the trained
    model computes, so the loss is zero unless the two passes differ in precision."""
    config = _config(tiny, "scit", "mixed_precision=bf16", "patterns.alpha=0", *extra)
    torch.manual_seed(0)
    model, frozen = load_fit_model(config, tiny, {}, LAYERS)
    model.eval()
    examples = fit_examples(PAIRS, tiny_tokenizer(), config)
    trainer = _trainer(config, model, frozen, examples, tmp_path / "ckpt")
    assert trainer.bf16
    return config, model, examples, trainer


def test_bf16_cached_targets_share_the_trained_pass_precision(tiny, tmp_path):
    config, model, examples, trainer = _fresh_bf16_setup(tiny, tmp_path, "fit.cache_dtype=float32")
    pad = tiny_tokenizer().pad_token_id
    compute_cache(trainer, examples, tmp_path / "cache", batch_size=3, dtype="float32")
    batch = FitCollator(pad, TargetCache(tmp_path / "cache"))(examples)
    with torch.no_grad():
        loss = trainer.stage_loss(model, batch).item()
        # What the floor would be: fp32 targets against the bf16 trained pass.
        trainer.bf16 = False
        fp32_targets = trainer.targets(FitCollator(pad)(examples))
        trainer.bf16 = True
        orig = batch["orig"]
        width = int(orig["reply_len"].max())
        with trainer.autocast():
            hidden = reply_hidden_states(model, orig, LAYERS, reply_width=width)
        floor = fitting_loss(hidden, fp32_targets, reply_mask(orig["reply_len"], width)).item()
    assert loss < 1e-6
    assert loss == 0.0  # the same computation on both sides
    assert floor > 1e-5  # the gap this guards against is real (a tiny model's is small)


def test_bf16_reaches_frozen_full_copies(tiny, tmp_path):
    """Frozen copies are not Trainer's model, so Trainer's autocast does not reach them; ours does."""
    config = _config(tiny, "dual", "step1.dual_storage=full-copies", "mixed_precision=bf16")
    step1 = {side: _write_step1(tiny, tmp_path / side, config, seed) for seed, side in enumerate(("preferred", "dispreferred"))}
    model, frozen = load_fit_model(config, tiny, step1, LAYERS)
    examples = fit_examples(PAIRS, tiny_tokenizer(), config)
    trainer = _trainer(config, model, frozen, examples, tmp_path / "ckpt")
    dtypes: list[torch.dtype] = []
    copy = frozen.copies["preferred"]
    linear = next(m for m in copy.modules() if isinstance(m, torch.nn.Linear))
    handle = linear.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    try:
        with torch.no_grad():
            trainer.stage_loss(model, FitCollator(tiny_tokenizer().pad_token_id)(examples[:4]))
    finally:
        handle.remove()
    assert dtypes and set(dtypes) == {torch.bfloat16}


# ------------------------------------------------------------------ bench/efficiency.py's building blocks


def _bench():
    import sys

    bench = str(Path(__file__).resolve().parents[1] / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import efficiency
    import stages

    return efficiency, stages


def test_fixed_window_is_the_reference_layout():
    """Prompt left-padded to its window, reply right-padded to its: reply token t sits at
    prompt_window + t in every row, and only real tokens are attended."""
    from rahf.data.render import Encoded

    _, stages = _bench()
    rows = [Encoded([5, 6, 7], [8, 9], False, False), Encoded([1] * 12, [2, 3, 4, 5, 6], True, False)]
    batch = stages.fixed_window(rows, pad_id=0, prompt_window=8, reply_window=4)
    assert batch["input_ids"].tolist() == [[0, 0, 0, 0, 0, 5, 6, 7, 8, 9, 0, 0], [1] * 8 + [2, 3, 4, 5]]
    assert batch["attention_mask"].tolist() == [[0] * 5 + [1] * 5 + [0] * 2, [1] * 12]
    assert batch["reply_start"].tolist() == [8, 8] and batch["reply_len"].tolist() == [2, 4]


def test_reference_examples_put_the_instruction_in_all_three_inputs(tiny):
    efficiency, _ = _bench()
    config = _config(tiny, "dual", "patterns.reply=both")
    ours = fit_examples(PAIRS[:3], tiny_tokenizer(), config)
    theirs = efficiency.reference_examples(PAIRS[:3], tiny_tokenizer(), config)
    assert [e.index for e in theirs] == [e.index for e in ours]
    for mine, ref in zip(ours, theirs, strict=True):
        prompts = {tuple(ref.inputs[role].prompt_ids) for role in ("orig", "preferred", "dispreferred")}
        assert len(prompts) == 1  # the same input, I+ included, for every role
        assert len(ref.inputs["orig"].prompt_ids) > len(mine.inputs["orig"].prompt_ids)  # Dual's own has none
        assert ref.inputs["orig"].reply_ids == mine.inputs["orig"].reply_ids


def test_step1_loss_equals_trl_sft_loss_on_the_same_batch(tiny, tmp_path):
    """The step-1 comparison trains the same objective: rahf's reply-only loss and TRL's
    completion-only loss agree on one batch of the same token sequences (fp32)."""
    from rahf.method.step1_dual import sft_examples

    _, stages = _bench()
    config = _config(tiny, "dual", "step1.train.batch_size=4", "step1.train.max_steps=1")
    torch.manual_seed(0)
    model = add_lora(load_model(tiny, device="cpu"), config.step1.lora)
    encoded = sft_examples(PAIRS[:4], tiny_tokenizer(), config, "preferred")
    args = training_arguments(config, config.step1.train, tmp_path / "out", stage="bench")
    ours, theirs = stages.step1_losses(model, tiny_tokenizer(), encoded, args)
    assert ours > 1.0  # a random tiny model: about log(vocab)
    assert theirs == pytest.approx(ours, abs=1e-5)
