"""The fit's batches keep memory flat over an epoch (issue #17).

- The costliest batch (padded tokens over all roles) comes first, so a run that does not fit
  fails at step 1 and later steps reuse what the first one took.
- Freed heap pages go back to the OS at each step end (glibc ``malloc_trim``), so a large
  batch that comes back late in the epoch does not grow the heap around what earlier steps left.
- Each role's padded width is a multiple of ``PAD_MULTIPLE``: an epoch has few distinct batch
  shapes (per-shape oneDNN caches under bf16 autocast, and heap fragmentation, grew with them),
  and the padding changes no loss.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
from pathlib import Path

import pytest
import torch

from rahf.config import load_config
from rahf.data.schema import PreferencePair
from rahf.method.fit import (
    PAD_MULTIPLE,
    FitCollator,
    FitTrainer,
    ReleaseFreedMemory,
    _glibc_malloc_trim,
    length_grouped_order,
    load_fit_model,
    padded_tokens,
    role_lengths,
)
from rahf.method.patterns import ROLES, fit_examples, pattern_source
from rahf.testing import save_tiny, tiny_tokenizer
from rahf.trainer import training_arguments

LAYERS = [1, 3]
WORDS = "whisk two eggs with milk then cook them slowly in butter and stir".split()


def _pair(i: int, reply_words: int) -> PreferencePair:
    prompt = ({"role": "user", "content": f"Recipe {i}: scrambled eggs?"},)
    reply = " ".join(WORDS[j % len(WORDS)] for j in range(reply_words))
    return PreferencePair(prompt, reply, f"Not sure, {i}.", f"t:{i}")


# 22 replies of 1 to 16 words: a partial last batch, and many widths without rounding.
PAIRS = [_pair(i, n) for i, n in enumerate([1, 16, 3, 9, 2, 14, 5, 11, 1, 15, 6, 12, 4, 10, 2, 13, 7, 8, 3, 12, 5, 16])]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(save_tiny(tmp_path_factory.mktemp("model") / "tiny", layers=4))


def _config(tiny: str, method: str = "scit"):
    return load_config(None, [
        f"model={tiny}", f"method={method}", f"patterns.target_layers={LAYERS}", "device=cpu",
        "fit.train.batch_size=4", "report_to=[none]", "max_reply_tokens=96", "patterns.reply=chosen",
        "mixed_precision=no",
    ])


def _trainer(tiny: str, out: Path, *, pad_multiple: int = PAD_MULTIPLE):
    config = _config(tiny)
    model, frozen = load_fit_model(config, tiny, {}, LAYERS)
    model.eval()
    tok = tiny_tokenizer()
    examples = fit_examples(PAIRS, tok, config)
    trainer = FitTrainer(
        model=model, args=training_arguments(config, config.fit.train, out, stage="fit"),
        train_dataset=examples, data_collator=FitCollator(tok.pad_token_id, pad_multiple=pad_multiple),
    )
    trainer.setup_fit(
        layers=LAYERS, alpha=config.patterns.alpha, source=pattern_source(config), frozen=frozen,
        pad_id=tok.pad_token_id, truncate=True, batch_frozen=True, kl_weight=0.0, group_by_length=True,
    )
    return trainer, model, examples


def _tokens(batch: dict) -> int:
    """Tokens the batch's passes process, padding included, over all roles."""
    return sum(batch[role]["input_ids"].numel() for role in ROLES)


def _epoch(trainer: FitTrainer, epoch: int) -> list[dict]:
    loader = trainer.get_train_dataloader()
    loader.set_epoch(epoch)
    return list(loader)


def test_costliest_full_group_first_partial_group_last():
    # Mega-batches of one group: 9 examples make two full groups and, from the example drawn
    # last, a partial group of one. Batches are cut every 4 indices, so the partial group must
    # go last or every later batch would straddle two groups.
    lengths = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    longest_alone = 0
    for seed in range(20):
        order = length_grouped_order(lengths, 4, torch.Generator().manual_seed(seed), mega_groups=1)
        assert sorted(order) == list(range(9))
        first, second = [lengths[i] for i in order[:4]], [lengths[i] for i in order[4:8]]
        assert first == sorted(first, reverse=True) and second == sorted(second, reverse=True)  # whole groups
        assert first[0] >= second[0]  # the costlier full group (4 x its longest) first
        longest_alone += lengths[order[-1]] == 9
    # The longest example alone in the partial group (9 tokens < a full group's 4 x 9 or more):
    # the old rule, "the group with the longest example first", put it first.
    assert longest_alone > 0
    # Per role: example 0 has the longest single input (50) but example 1 the most tokens (120).
    roles = [(10, 50, 10), (40, 40, 40), (5, 6, 7)]
    assert padded_tokens(roles, [0]) == 70 and padded_tokens(roles, [1]) == 120
    for seed in range(5):
        assert length_grouped_order(roles, 1, torch.Generator().manual_seed(seed))[0] == 1
    # Costs count tokens as the collator pads them: 33 and 47 tokens both take 48.
    assert padded_tokens([(33,), (47,)], [0], 16) == padded_tokens([(33,), (47,)], [1], 16) == 48


def test_trainer_puts_the_costliest_batch_first_every_epoch(tiny, tmp_path):
    trainer, _, examples = _trainer(tiny, tmp_path / "ckpt")
    lengths = [role_lengths(e) for e in examples]
    assert len({n[1] for n in lengths}) > 1 and any(len(set(n)) > 1 for n in lengths)  # roles differ (SCIT)
    for epoch in range(4):
        batches = _epoch(trainer, epoch)
        assert sorted(int(i) for b in batches for i in b["orig"]["reply_len"]) == sorted(
            len(e.inputs["orig"].reply_ids) for e in examples)  # every example once
        assert batches[-1]["orig"]["input_ids"].shape[0] == len(examples) % 4  # the partial batch, last
        # Batches are whole groups of the sorted order: their length ranges do not interleave
        # (a partial group in the middle would shift every later batch across two groups).
        ranges = sorted((int(m.min()), int(m.max())) for m in (b["orig"]["attention_mask"].sum(1) for b in batches))
        assert all(ranges[k][1] <= ranges[k + 1][0] for k in range(len(ranges) - 1))
        costs = [_tokens(b) for b in batches]
        assert costs[0] == max(costs)
        assert costs[0] > sorted(costs)[len(costs) // 2]  # the lengths differ enough to tell


def test_padding_to_a_multiple_bounds_the_batch_shapes(tiny, tmp_path):
    rounded, _, examples = _trainer(tiny, tmp_path / "a")
    exact, _, _ = _trainer(tiny, tmp_path / "b", pad_multiple=1)
    shapes = {}
    for name, trainer in (("rounded", rounded), ("exact", exact)):
        batches = [b for epoch in range(3) for b in _epoch(trainer, epoch)]
        for b in batches:
            for role in ROLES:
                width = b[role]["input_ids"].shape[1]
                assert name == "exact" or width % PAD_MULTIPLE == 0
                assert int(b[role]["attention_mask"].sum(1).max()) > width - (PAD_MULTIPLE if name == "rounded" else 1)
        shapes[name] = {tuple(b[r]["input_ids"].shape) for b in batches for r in ROLES}
    longest = max(max(role_lengths(e)) for e in examples)
    assert len(shapes["rounded"]) <= 2 * -(-longest // PAD_MULTIPLE)  # full and partial batches
    assert len(shapes["rounded"]) < len(shapes["exact"])


def test_rounded_padding_leaves_the_loss_unchanged(tiny, tmp_path):
    trainer, model, examples = _trainer(tiny, tmp_path / "ckpt")
    generator = torch.Generator().manual_seed(0)
    for name, p in sorted(model.named_parameters()):
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=generator) * 0.1)  # a loss that is not 0
    pad = tiny_tokenizer().pad_token_id
    part = [e for e in examples if len(e.inputs["orig"].input_ids) % PAD_MULTIPLE][:5]  # widths that get padded
    exact, rounded = FitCollator(pad, pad_multiple=1)(part), FitCollator(pad)(part)
    assert rounded["orig"]["input_ids"].shape[1] > exact["orig"]["input_ids"].shape[1]
    for role in ROLES:
        for key in ("reply_start", "reply_len"):
            assert torch.equal(exact[role][key], rounded[role][key])
    with torch.no_grad():
        losses = [trainer.stage_loss(model, batch).item() for batch in (exact, rounded)]
    assert losses[0] > 0
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)


def _rss_kb() -> int:
    return int(re.search(r"^VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


@pytest.mark.skipif(not Path("/proc/self/status").exists() or _glibc_malloc_trim() is None, reason="glibc on Linux")
def test_freed_heap_pages_go_back_to_the_os_at_each_step_end(tiny, tmp_path):
    trainer, _, _ = _trainer(tiny, tmp_path / "ckpt")
    callbacks = [c for c in trainer.callback_handler.callbacks if isinstance(c, ReleaseFreedMemory)]
    assert len(callbacks) == 1  # setup_fit registers it once
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    # 160 MB in 64 KB blocks (under the mmap threshold: from the heap), touched, then all freed
    # but the last, which pins the heap's top: free() alone cannot hand the pages back.
    blocks = [libc.malloc(64 << 10) for _ in range(2560)]
    for block in blocks:
        ctypes.memset(block, 1, 64 << 10)
    for block in blocks[:-1]:
        libc.free(block)
    before = _rss_kb()
    callbacks[0].on_step_end(trainer.args, trainer.state, trainer.control)
    after = _rss_kb()
    libc.free(blocks[-1])
    assert before - after > 100 << 10  # most of the 160 MB left the resident set
