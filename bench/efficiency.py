"""Benchmark: the RAHF-Dual pipeline stage by stage, and the fit step per optimisation.

On the embedded default model (SmolLM2-135M-Instruct, 30 blocks) with a fixed sample of the
built-in pairs (``--pairs-from alpacaeval``: AlpacaEval's dev pairs from ``../shared/data``, long
prompts) and a workload (``--workload realistic``: issue 15's measurement, batch 8, prompt
window 256, reply window 64, layers 10..20 step 2, alpha 5; ``demo``: the demo recipe's), one
epoch of the fit step (frozen pattern passes + trained forward/backward + optimizer step,
through ``FitTrainer`` exactly as ``rahf align`` runs it) is timed for:

* ``reference``: the reference code's Dual step-2 workload (issue 15, "How it is measured"):
  the preferred and dispreferred models as full merged copies, a separate full frozen copy for
  the original model, plus the trained model (4 models); every forward through all blocks and
  the LM head; every role left-padded to the prompt window and right-padded to the reply window
  (fixed width); gradient checkpointing on; I+ as system prompt in all three inputs; bf16
  autocast with an fp32 trained copy.
* ``default``: our defaults (adapters on one base, truncated forwards, length-grouped batches,
  each prompt run once for both replies of its pair).
* one row per optimisation turned off from the default, and extra rows (bf16 autocast, cached
  targets as seen from the second epoch on, gradient checkpointing on).

Then each other stage (``bench/stages.py``): Dual step 1 per side, the same step 1 under TRL's
SFTTrainer, SCIT step 1, the targets pass, export.

Step-1 adapters are created fresh (random non-zero LoRA B, so the two sides differ): their
values do not change throughput. Each (configuration, repetition) runs in a fresh subprocess, so
its peak resident memory is its own; configurations alternate within each repetition and the
table reports medians. This machine's fp32 (and bf16) matmul peak is measured in the same run.

    python bench/efficiency.py [--reps 3] [--pairs 8] [--threads N] [--rows a,b] [--stages a,b]
                               [--workload realistic|demo] [--pairs-from builtin|alpacaeval] [--quick] [--no-write]

FLOP count (analytic, documented in BENCHMARKS.md): per block and token a forward costs
``2 * P_block`` (P_block = weights of one block) plus LoRA ``2 * r * (in + out)`` per adapted
linear plus attention ``4 * heads * head_dim * T`` (full T x T, padding included: the mask is
explicit); the LM head costs ``2 * hidden * vocab`` per position it is computed on. The trained
pass's backward runs only through blocks below the top target layer and computes input gradients
of the frozen weights (``2 * P_block`` per token and block) plus input and weight gradients of
the LoRA (2x its forward) and attention (2x its forward); a shared-prompt pass counts its distinct
prompts once and its replies' attention over prompt + reply keys; gradient checkpointing adds the
trained pass's forward through those blocks once more. Padded tokens count: they are computed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from benchlib import cpu_name, write_section
from stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"
BATCH_SIZE = 4  # fit.train.batch_size default
ALPACAEVAL = ROOT.parent / "shared" / "data" / "alpacaeval-prefs" / "dev.jsonl.gz"  # --pairs-from alpacaeval


@dataclass(frozen=True)
class Row:
    """One configuration: ``--set`` overrides on top of the Dual defaults, plus bench-only switches."""

    name: str
    label: str
    overrides: tuple[str, ...] = ()
    orig_copy: bool = False  # a separate full frozen copy for A_o (reference layout)
    cached: bool = False  # time an epoch that reads cached targets (cache built before timing)
    fixed_window: bool = False  # every role padded to prompt window + reply window (reference layout)
    all_instruction: bool = False  # I+ as system prompt in all three inputs (reference code's Dual)
    share: bool = True  # a prompt both replies of a pair share runs once per frozen model (issue 15)
    share_trained: bool | str = "auto"  # ... and in the trained pass: True, False, or "auto" (fit.share_prompt's default)
    keep_pairs: bool = True  # batches hold whole pairs (without: the sampler before issue 15's shared prompt)


REFERENCE = Row(
    "reference",
    "reference-style: 4 full models, full forwards, fixed prompt+reply windows, I+ in all inputs,"
    " gradient checkpointing, bf16 autocast (fp32 trained copy)",
    ("step1.dual_storage=full-copies", "fit.truncate_forward=false", "fit.batch_frozen=false",
     "fit.group_by_length=false", "mixed_precision=bf16", "gradient_checkpointing=true"),
    orig_copy=True, fixed_window=True, all_instruction=True, share=False,
)
DEFAULT = Row("default", "our default (adapters, truncated, batched, grouped, shared prompt: frozen passes, trained"
              " pass where it skips > 25% of positions; bf16 autocast where native)")
FP32 = Row("fp32", "default - bf16 autocast (mixed_precision=no)", ("mixed_precision='no'",))
BF16 = Row("bf16", "default + bf16 autocast (mixed_precision=bf16)", ("mixed_precision=bf16",))
ROWS = [
    REFERENCE,
    DEFAULT,
    Row("before", "default before the shared prompt (each reply's frozen passes run its prompt; pairs split"
        " across batches)", share=False, keep_pairs=False),
    Row("no-share", "default - shared prompt (each reply's passes run its prompt again; batches hold whole pairs)",
        share=False),
    Row("share-frozen", "default, the trained pass never shares (fit.share_prompt: frozen)", share_trained=False),
    Row("share-trained", "default, the trained pass always shares (fit.share_prompt: all)", share_trained=True),
    Row("no-truncate", "default - truncated forward", ("fit.truncate_forward=false",)),
    Row("no-grouping", "default - group_by_length", ("fit.group_by_length=false",)),
    Row("full-copies", "default - adapters (2 merged copies)", ("step1.dual_storage=full-copies",)),
    FP32,  # run when the default resolves to bf16 on this machine, else BF16
    BF16,
    Row("cached", "default + cached targets (epoch >= 2)", ("fit.targets=cached",), cached=True),
    Row("checkpointing", "default + gradient checkpointing", ("gradient_checkpointing=true",)),
]
# The workload of issue 15's measurement (the reference code's Dual settings); --demo: the demo's.
REALISTIC = {"batch": 8, "prompt": 256, "reply": 64, "layers": "10,12,14,16,18,20", "alpha": 5.0}
DEMO = {"batch": 8, "prompt": 128, "reply": 64, "layers": None, "alpha": 2.5}


# ------------------------------------------------------------------ FLOPs (analytic)


@dataclass
class Shape:
    """What the FLOP count needs from the model config."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    blocks: int
    linears: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (in, out)

    @classmethod
    def of(cls, config) -> Shape:
        h, i = config.hidden_size, config.intermediate_size
        hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
        q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
        linears = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                   "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        return cls(h, i, config.num_attention_heads, config.num_key_value_heads, hd,
                   config.vocab_size, config.num_hidden_layers, linears)

    @property
    def block_params(self) -> int:
        return sum(a * b for a, b in self.linears.values())

    def lora(self, r: int, modules: list[str]) -> int:
        """FLOPs per token and block of one LoRA's forward."""
        names = self.linears if modules == ["all-linear"] else modules
        return sum(2 * r * sum(self.linears[m]) for m in names)

    def forward(self, b: int, t: int, blocks: int, lora: int, head_positions: int) -> float:
        per_block = b * t * (2 * self.block_params + lora) + b * 4 * self.heads * self.head_dim * t * t
        return blocks * per_block + head_positions * 2 * self.hidden * self.vocab

    def backward(self, b: int, t: int, blocks: int, lora: int) -> float:
        return blocks * (b * t * (2 * self.block_params + 2 * lora) + 2 * b * 4 * self.heads * self.head_dim * t * t)

    def forward_split(self, split: Split, blocks: int, lora: int, head_positions: int) -> float:
        """A shared-prompt pass: ``u`` prompts of width ``p``, then ``b`` replies of width ``r``
        attending to ``p + r`` keys (``rahf.hidden_states.reply_hidden_states_shared``)."""
        u, p, b, r = split
        per_block = (u * p + b * r) * (2 * self.block_params + lora) + 4 * self.heads * self.head_dim * (u * p * p + b * r * (p + r))
        return blocks * per_block + head_positions * 2 * self.hidden * self.vocab

    def backward_split(self, split: Split, blocks: int, lora: int) -> float:
        u, p, b, r = split
        attention = 2 * 4 * self.heads * self.head_dim * (u * p * p + b * r * (p + r))
        return blocks * ((u * p + b * r) * (2 * self.block_params + 2 * lora) + attention)


Split = tuple[int, int, int, int]  # (distinct prompts, prompt width, rows, reply width) of a shared-prompt batch


def step_flops(shape: Shape, b: int, t: int, *, top: int, truncate: bool, frozen_lora: int,
               fit_lora: int, frozen_passes: bool, trained_pass: bool = True, recompute: bool = False,
               split: Split | None = None, frozen_split: bool = False, trained_split: bool = False) -> float:
    """FLOPs of one Dual fit step on a (b, t) batch (all three roles have the same width here).

    ``recompute``: gradient checkpointing runs the trained pass's forward again, during the
    backward, through the blocks the backward reaches (those below the top target layer).
    ``split``: the batch's shared-prompt shape, used by the frozen passes (``frozen_split``) and
    the trained pass (``trained_split``) when they run each distinct prompt once."""
    blocks = top if truncate else shape.blocks
    head = b if truncate else b * t

    def forward(n_blocks: int, lora: int, shared: bool, with_head: bool = True) -> float:
        if shared and split is not None:  # the prompt call's head runs on 1 position per row
            u, _, rows, r = split
            return shape.forward_split(split, n_blocks, lora, (u + (rows if truncate else rows * r)) * with_head)
        return shape.forward(b, t, n_blocks, lora, head * with_head)

    total = 0.0
    if frozen_passes:  # orig (no adapter), preferred and dispreferred (step-1 adapter or merged copy)
        total += forward(blocks, 0, frozen_split) + 2 * forward(blocks, frozen_lora, frozen_split)
    if trained_pass:
        shared = trained_split and split is not None
        total += forward(blocks, fit_lora, shared)
        total += shape.backward_split(split, top, fit_lora) if shared else shape.backward(b, t, top, fit_lora)
        if recompute:
            total += forward(top, fit_lora, shared, with_head=False)
    return total


# ------------------------------------------------------------------ worker (one subprocess)


class PeakRSS:
    """Samples this process's RSS with psutil (the high-water mark also comes from getrusage)."""

    def __init__(self, interval: float = 0.02) -> None:
        import psutil

        self.process, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def pair_sample(source: str, n: int) -> list:
    """The first ``n`` pairs of ``source``: the built-in pairs (short prompts), or AlpacaEval's dev
    pairs (``../shared/data``; long prompts, one pair per prompt first: ``interleave_by_prompt``)."""
    from rahf.data import load_preferences

    if source == "builtin":
        return load_preferences("builtin").pairs[:n]
    from benchlib import interleave_by_prompt

    return interleave_by_prompt(load_preferences(str(ALPACAEVAL), limit=max(n * 20, 400)).pairs)[:n]


def make_step1(work: Path, pairs: int, seed: int, source: str = "builtin") -> None:
    """Fresh Dual step-1 outputs (adapter/ and merged/ per side) and the fixed pair sample."""
    import torch

    from rahf.config import load_config
    from rahf.models import load_model, resolve_model_path
    from rahf.runs import save_pairs
    from rahf.trainer import add_lora

    config = load_config(None, ["method=dual", "device=cpu"])
    save_pairs(work / "pairs.jsonl", pair_sample(source, pairs + BATCH_SIZE))  # the first BATCH_SIZE warm up
    for offset, side in enumerate(("preferred", "dispreferred")):
        torch.manual_seed(seed + offset)
        model = add_lora(load_model("smollm2", device="cpu"), config.step1.lora)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.02)  # non-zero: the two sides differ from the base and each other
        folder = work / f"step1_{side}"
        model.save_pretrained(folder / "adapter")
        model.merge_and_unload().save_pretrained(folder / "merged")
    (work / "base.txt").write_text(resolve_model_path("smollm2"))


def split_of(batch: dict, multiple: int) -> tuple[Split, int] | None:
    """A batch's shared-prompt shape as ``rahf.hidden_states.reply_hidden_states_shared`` runs it
    (widths rounded up to ``multiple``), and its real tokens (each distinct prompt once); None when
    no prompt repeats (the one-call pass)."""
    from rahf.hidden_states import shared_prompts

    shared = shared_prompts(batch)
    if shared is None:
        return None
    firsts, _ = shared
    starts, lengths = batch["reply_start"], batch["reply_len"]

    def up(n: int) -> int:
        return -(-n // multiple) * multiple

    split = (len(firsts), up(max(int(starts.max()), 1)), len(starts), up(max(int(lengths.max()), 1)))
    return split, int(starts[firsts].sum()) + int(lengths.sum())


def workload_overrides(workload: dict) -> list[str]:
    """``--set`` items of a workload (batch, windows, layers, alpha) for every stage."""
    out = [f"fit.train.batch_size={workload['batch']}", f"step1.train.batch_size={workload['batch']}",
           f"max_prompt_tokens={workload['prompt']}", f"max_reply_tokens={workload['reply']}",
           f"patterns.alpha={workload['alpha']}"]
    return out + ([f"patterns.target_layers=[{workload['layers']}]"] if workload.get("layers") else [])


def reference_examples(pairs, tokenizer, config) -> list:
    """Fit examples as the reference code's Dual builds them: I+ as system prompt in all three
    inputs (base, preferred and dispreferred)."""
    from rahf.data.render import encode
    from rahf.method.patterns import ROLES, FitExample, pattern_replies

    windows = {"max_prompt_tokens": config.max_prompt_tokens, "max_reply_tokens": config.reply_window}
    return [
        FitExample({role: encode(tokenizer, pair.prompt, reply, instruction=config.preferred_instruction, **windows)
                    for role in ROLES}, index)
        for index, (pair, reply) in enumerate(pattern_replies(pairs, config.pattern_reply, config.seed))
    ]


def run_worker(row: Row, work: Path, threads: int, overrides: list[str]) -> dict:
    """Train one epoch of the fit step under ``row``; returns timings, memory and FLOPs."""
    import torch

    torch.set_num_threads(threads)
    with PeakRSS() as rss_all:
        return _worker(row, work, rss_all, overrides)


def _worker(row: Row, work: Path, rss_all: PeakRSS, overrides: list[str]) -> dict:
    import dataclasses

    import torch

    from rahf.config import load_config
    from rahf.method.fit import (
        FitCollator,
        FitTrainer,
        compute_cache,
        load_fit_model,
        trained_pass_shares,
    )
    from rahf.method.patterns import FROZEN, ROLES, fit_examples, pattern_source
    from rahf.method.targets import TargetCache
    from rahf.models import load_model, load_tokenizer, stop_token_ids
    from rahf.preflight import target_layers
    from rahf.runs import read_pairs
    from rahf.trainer import training_arguments

    base = (work / "base.txt").read_text()
    config = load_config(None, ["method=dual", f"model={base}", "device=cpu", "report_to=[none]",
                                *overrides, *row.overrides])
    layers = target_layers(config)
    batch_size = config.fit.train.batch_size
    tokenizer = load_tokenizer(base)
    pairs = read_pairs(work / "pairs.jsonl")
    step1 = {side: str(work / f"step1_{side}") for side in ("preferred", "dispreferred")}
    torch.manual_seed(0)
    model, frozen = load_fit_model(config, base, step1, layers)
    if row.orig_copy:
        frozen.copies[FROZEN] = load_model(base, dtype=config.dtype, device="cpu").eval().requires_grad_(False)
    examples = (reference_examples if row.all_instruction else fit_examples)(pairs, tokenizer, config)
    warm, timed = examples[:1], examples[2 * BATCH_SIZE:]  # the sample starts with BATCH_SIZE warm-up pairs
    timed = [dataclasses.replace(e, index=i) for i, e in enumerate(timed)]  # cache rows 0..n-1
    if not row.keep_pairs:  # no pair ids: the length-grouped sampler as before issue 15's shared prompt
        timed = [dataclasses.replace(e, pair=-1) for e in timed]

    shapes: list[tuple[int, int, int]] = []  # (batch, padded width, real tokens) of each orig batch
    splits: list[tuple[Split, int] | None] = []  # shared-prompt shape and its real tokens, per batch
    trained_shares: list[bool] = []  # whether the trained pass runs the batch's prompts once

    class CountingCollator(FitCollator):
        def __call__(self, batch_examples):
            if row.fixed_window:  # the reference layout: every role prompt window + reply window wide
                from stages import fixed_window

                batch = {role: fixed_window([e.inputs[role] for e in batch_examples], self.pad_id,
                                            config.max_prompt_tokens, config.reply_window) for role in ROLES}
            else:
                batch = super().__call__(batch_examples)
            ids = batch["orig"]["input_ids"]
            shapes.append((ids.shape[0], ids.shape[1], int(batch["orig"]["attention_mask"].sum())))
            splits.append(split_of(batch["orig"], self.pad_multiple) if row.share else None)
            trained_shares.append(row.share and trained_pass_shares(batch["orig"], row.share_trained, self.pad_multiple))
            return batch

    def trainer_for(dataset, cache=None) -> FitTrainer:
        args = training_arguments(config, config.fit.train, work / "out" / row.name, stage="fit")
        args = dataclasses.replace(args, save_strategy="no", logging_strategy="no", disable_tqdm=True)
        trainer = FitTrainer(model=model, args=args, train_dataset=dataset,
                             data_collator=CountingCollator(tokenizer.pad_token_id, cache))
        trainer.setup_fit(
            layers=layers, alpha=config.patterns.alpha, source=pattern_source(config), frozen=frozen,
            pad_id=tokenizer.pad_token_id, truncate=config.fit.truncate_forward,
            batch_frozen=config.fit.batch_frozen, kl_weight=config.fit.kl_weight, stop_weight=config.fit.stop_weight,
            stop_ids=stop_token_ids(model, tokenizer), anchor_weight=config.fit.anchor_weight,
            anchor_tokens=config.reply_window, group_by_length=config.fit.group_by_length,
            share_prompt=row.share, share_trained_prompt=row.share_trained if row.share else False,
        )
        return trainer

    cache, cache_seconds = None, None
    trainer = trainer_for(warm)
    trainer.train()  # warm-up: one step on one other example (lazy initialisation, allocator)
    if row.cached:
        started = time.perf_counter()
        compute_cache(trainer, timed, work / "cache" / row.name, batch_size=batch_size, dtype=config.fit.cache_dtype)
        cache_seconds = time.perf_counter() - started
        cache = TargetCache(work / "cache" / row.name)
    shapes.clear()
    splits.clear()
    trained_shares.clear()
    trainer = trainer_for(timed, cache)
    with PeakRSS() as rss_fit:
        started, cpu_started = time.perf_counter(), time.process_time()
        trainer.prefetch_anchors(timed)  # fit.anchor_weight: its replies are part of the fit's cost (else no-op)
        trainer.train()
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started

    shape = Shape.of(model.config)
    frozen_lora = 0 if config.step1.dual_storage == "full-copies" else shape.lora(config.step1.lora.r, config.step1.lora.target_modules)
    fit_lora = shape.lora(config.fit.lora.r, config.fit.lora.target_modules)
    checkpointing = trainer.args.activation_checkpointing  # auto resolved; it stops the trained pass sharing
    # The analytic count covers the pattern fit; the next-token and anchor terms' passes are not in it.
    flops = sum(
        step_flops(shape, b, t, top=max(layers), truncate=config.fit.truncate_forward, frozen_lora=frozen_lora,
                   fit_lora=fit_lora, frozen_passes=cache is None, recompute=checkpointing,
                   split=split[0] if split else None, frozen_split=True, trained_split=shares and not checkpointing)
        for (b, t, _), split, shares in zip(shapes, splits, trained_shares, strict=True)
    )
    # Tokens the passes process: with a shared prompt, each distinct prompt once, then the replies.
    processed: list[tuple[int, int]] = []  # (tokens computed, padding included; real tokens) per batch
    for (b, t, n), split in zip(shapes, splits, strict=True):
        if split is None:
            processed.append((b * t, n))
        else:
            (u, p, rows, r), real = split
            processed.append((u * p + rows * r, real))
    return {
        "row": row.name,
        "examples": len(timed),
        "pairs": len(timed) / 2,  # Dual fits both replies of each pair
        "steps": len(shapes),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,  # all threads of this process: robust to other jobs' load
        "padded_tokens": sum(t for t, _ in processed),
        "real_tokens": sum(n for _, n in processed),
        "flops": flops,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_fit_mb": rss_fit.peak / 2**20,
        "cache_seconds": cache_seconds,
        "trained_shared_batches": sum(trained_shares) / max(len(trained_shares), 1),
        "bf16": bool(trainer.args.bf16),
    }


def scit_batching(work: Path, threads: int, rounds: int = 3) -> dict:
    """SCIT frozen passes for one batch: one batched call vs one call per role, alternating.

    ``batch_frozen`` only matters where roles share a model state, i.e. SCIT (Dual gives each
    role its own state), so its share is measured here on the frozen passes alone.
    """
    import torch

    from rahf.config import load_config
    from rahf.method.patterns import (
        ModelStates,
        collate_roles,
        fit_examples,
        frozen_patterns,
        pattern_source,
    )
    from rahf.models import load_model, load_tokenizer
    from rahf.preflight import target_layers
    from rahf.runs import read_pairs
    from rahf.trainer import add_lora

    torch.set_num_threads(threads)
    base = (work / "base.txt").read_text()
    config = load_config(None, ["method=scit", f"model={base}", "device=cpu"])
    layers = target_layers(config)
    tokenizer = load_tokenizer(base)
    model = add_lora(load_model(base, device="cpu"), config.fit.lora, blocks=range(max(layers)))
    examples = fit_examples(read_pairs(work / "pairs.jsonl")[BATCH_SIZE : 2 * BATCH_SIZE], tokenizer, config)
    batches = collate_roles(examples, tokenizer.pad_token_id)
    frozen, passes = ModelStates(model), pattern_source(config)

    def run(batched: bool) -> float:
        started = time.perf_counter()
        frozen_patterns(frozen, passes, batches, layers, pad_id=tokenizer.pad_token_id, batch_frozen=batched)
        return time.perf_counter() - started

    run(True)  # warm-up
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(rounds):
        for batched in ((True, False) if r % 2 == 0 else (False, True)):
            times[batched].append(run(batched))
    widths = [b["input_ids"].shape[1] for b in batches.values()]
    return {
        "batched_s": statistics.median(times[True]), "separate_s": statistics.median(times[False]),
        "examples": len(examples), "padded_tokens_batched": 3 * len(examples) * max(widths),
        "padded_tokens_separate": len(examples) * sum(widths),
    }


# ------------------------------------------------------------------ parent: schedule and report


def matmul_peak(threads: int, dtype_name: str = "float32", n: int = 2048, tries: int = 6) -> dict[str, float]:
    """Best-of-``tries`` GFLOP/s of an n x n matmul, per wall second and per CPU second (one
    core's rate, whatever the thread count): this machine's practical peak right now."""
    import torch

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    wall = cpu = float("inf")
    for _ in range(tries):
        started, cpu_started = time.perf_counter(), time.process_time()
        a @ b
        wall, cpu = min(wall, time.perf_counter() - started), min(cpu, time.process_time() - cpu_started)
    return {"wall": 2 * n**3 / wall / 1e9, "cpu": 2 * n**3 / max(cpu, 1e-9) / 1e9}


def spawn(args: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"worker {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def summarise(results: list[dict], rows: list[Row], peaks: dict[str, dict[str, float]]) -> list[dict]:
    """Medians per row. Throughput per wall second, and per CPU second of the process (less
    sensitive to other jobs on a shared machine); GFLOP per CPU second against the matmul's."""
    table = []
    for row in rows:
        runs = [r for r in results if r["row"] == row.name]
        if not runs:
            continue
        med = {k: statistics.median(r[k] for r in runs) for k in ("seconds", "cpu_seconds", "peak_rss_mb", "peak_rss_fit_mb")}
        first = runs[0]
        gflops = first["flops"] / med["cpu_seconds"] / 1e9
        peak = peaks["bfloat16" if first["bf16"] else "float32"]["cpu"]
        table.append({
            "row": row.name, "label": row.label, "pairs_s": first["pairs"] / med["seconds"],
            "pairs_cpu_s": first["pairs"] / med["cpu_seconds"],
            "spread": (min(first["pairs"] / r["seconds"] for r in runs), max(first["pairs"] / r["seconds"] for r in runs)),
            "peak_mb": med["peak_rss_mb"], "fit_mb": med["peak_rss_fit_mb"],
            "gflops": gflops, "peak_share": gflops / peak, "padding": 1 - first["real_tokens"] / first["padded_tokens"],
            "flops_pair": first["flops"] / first["pairs"],
            "cache_s": statistics.median(r["cache_seconds"] for r in runs) if first["cache_seconds"] else None,
        })
    return table


def render(table: list[dict]) -> str:
    lines = [
        "| configuration | pairs/s wall (min-max) | pairs per CPU-s | peak RSS MB | RSS during fit MB"
        " | GFLOP per CPU-s | of matmul peak | padding |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in table:
        extra = f" (cache built in {t['cache_s']:.1f} s)" if t["cache_s"] else ""
        lines.append(
            f"| {t['label']}{extra} | {t['pairs_s']:.3f} ({t['spread'][0]:.3f}-{t['spread'][1]:.3f}) |"
            f" {t['pairs_cpu_s']:.3f} | {t['peak_mb']:.0f} | {t['fit_mb']:.0f} | {t['gflops']:.1f} |"
            f" {t['peak_share']:.0%} | {t['padding']:.1%} |"
        )
    return "\n".join(lines)


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=8, help="pairs timed per configuration (x2 fit examples)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rows", default=",".join(r.name for r in ROWS), help="comma-separated row names ('' for none)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages ('' for none)")
    parser.add_argument("--workload", choices=("realistic", "demo"), default="realistic",
                        help="realistic: batch 8, prompt 256, reply 64, layers 10..20 step 2, alpha 5 (issue 15);"
                             " demo: the demo recipe's batch, windows and alpha")
    parser.add_argument("--pairs-from", choices=("builtin", "alpacaeval"), default="builtin",
                        help="builtin: the built-in pairs (short prompts); alpacaeval: ../shared/data's AlpacaEval"
                             " dev pairs (long prompts, one pair per prompt)")
    parser.add_argument("--quick", action="store_true", help="1 rep, 4 pairs, reference/default rows, step 1 vs TRL")
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", default="[]", help=argparse.SUPPRESS)
    parser.add_argument("--scit-batching", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.reps, args.pairs, args.rows, args.stages = 1, 4, "reference,default", "step1-preferred,trl-sft"
    overrides = json.loads(args.overrides)
    if args.pairs_from == "alpacaeval" and not ALPACAEVAL.exists():
        print(f"bench/efficiency.py: --pairs-from alpacaeval needs {ALPACAEVAL} (the shared data folder), which is"
              " missing here; nothing run")
        return 0
    if args.prepare:
        make_step1(Path(args.work), args.pairs, seed=0, source=args.pairs_from)
        return 0
    if args.scit_batching:
        print(json.dumps(scit_batching(Path(args.work), args.threads)))
        return 0
    if args.worker:
        row = next(r for r in ROWS if r.name == args.worker)
        print(json.dumps(run_worker(row, Path(args.work), args.threads, overrides)))
        return 0
    if args.stage:
        from stages import run_stage

        print(json.dumps(run_stage(args.stage, Path(args.work), overrides, args.threads)))
        return 0

    import torch

    from rahf.config import load_config
    from rahf.trainer import use_bf16

    workload = REALISTIC if args.workload == "realistic" else DEMO
    extra = json.dumps(workload_overrides(workload))
    default_bf16 = use_bf16(load_config(None, ["method=dual", "device=cpu"]))
    skip = BF16.name if default_bf16 else FP32.name  # the other one is the default itself
    rows = [r for r in ROWS if r.name in args.rows.split(",") and r.name != skip]
    stage_names = [name for name in STAGES if name in args.stages.split(",")]
    command = "python bench/efficiency.py " + " ".join(sys.argv[1:])
    print(f"$ {command}\nload average before: {load_average()}", flush=True)
    started = time.time()
    peaks = {"float32": matmul_peak(args.threads), "bfloat16": matmul_peak(args.threads, "bfloat16")}
    results: list[dict] = []
    stage_results: list[dict] = []
    scit: dict = {}
    with tempfile.TemporaryDirectory(prefix="rahf-bench-") as tmp:
        spawn(["--prepare", "--work", tmp, "--pairs", str(args.pairs), "--pairs-from", args.pairs_from], args.threads)
        for rep in range(args.reps):
            order = rows if rep % 2 == 0 else rows[::-1]  # alternate, and reverse to cancel drift
            for row in order:
                result = spawn(["--worker", row.name, "--work", tmp, "--threads", str(args.threads),
                                "--overrides", extra], args.threads)
                results.append(result)
                print(f"rep {rep + 1} {row.name:13s} {result['pairs'] / result['seconds']:.3f} pairs/s"
                      f" ({result['pairs'] / result['cpu_seconds']:.3f} per CPU-s)  peak {result['peak_rss_mb']:.0f} MB"
                      f"  trained pass shared in {result['trained_shared_batches']:.0%} of batches  load {load_average()}",
                      flush=True)
            for name in (stage_names if rep % 2 == 0 else stage_names[::-1]):
                result = spawn(["--stage", name, "--work", tmp, "--threads", str(args.threads), "--overrides", extra],
                               args.threads)
                stage_results.append(result)
                print(f"rep {rep + 1} {name:18s} {result['cpu_seconds']:.2f} CPU-s ({result['seconds']:.2f} s wall)"
                      f" for {result['real_tokens']} tokens; peak {result['peak_rss_mb']:.0f} MB; load {load_average()}",
                      flush=True)
        if not args.quick and rows:
            scit = spawn(["--scit-batching", "--work", tmp, "--threads", str(args.threads)], args.threads)
    after = {k: matmul_peak(args.threads, k) for k in peaks}  # before and after the runs: keep the best
    peaks = {k: {m: max(peaks[k][m], after[k][m]) for m in ("wall", "cpu")} for k in peaks}
    table = summarise(results, rows, peaks)
    stage_table = summarise_stages(stage_results, stage_names, peaks)
    notes = findings(table, scit, stage_table)
    minutes = (time.time() - started) / 60
    precision = ("bf16 autocast (mixed_precision auto: this CPU computes bf16 natively)" if default_bf16
                 else "fp32 (mixed_precision auto: no native bf16 on this CPU)")
    body = render(table) + ("\n\n" + render_stages(stage_table) if stage_table else "")
    print(f"\n{body}\n\n{notes}\n{peak_line(peaks, args.threads)}; default precision here: {precision}"
          f"\nload average after: {load_average()}; wall {minutes:.1f} min")
    if args.no_write:
        return 0
    write_section("efficiency", report(command, args, workload, body, notes, peaks, minutes, torch.__version__, precision))
    print(f"wrote the efficiency section of {BENCHMARKS}")
    return 0


def summarise_stages(results: list[dict], names: list[str], peaks: dict[str, dict[str, float]]) -> list[dict]:
    """Medians per stage: real tokens per wall and per CPU second, GFLOP per CPU-s against the matmul's."""
    table = []
    for name in names:
        runs = [r for r in results if r["stage"] == name]
        if not runs:
            continue
        first = runs[0]
        med = {k: statistics.median(r[k] for r in runs) for k in ("seconds", "cpu_seconds", "peak_rss_mb")}
        tokens = first["real_tokens"]
        gflops = first["flops"] / med["cpu_seconds"] / 1e9 if first["flops"] else None
        peak = peaks["bfloat16" if first["bf16"] else "float32"]["cpu"]
        table.append({
            "stage": name, "tokens": tokens, "steps": first.get("steps", 0), "seconds": med["seconds"],
            "cpu_seconds": med["cpu_seconds"], "tokens_s": tokens / med["seconds"] if tokens else None,
            "tokens_cpu_s": tokens / med["cpu_seconds"] if tokens else None, "peak_mb": med["peak_rss_mb"],
            "gflops": gflops, "peak_share": gflops / peak if gflops else None,
            "padding": 1 - tokens / first["padded_tokens"] if first["padded_tokens"] else None,
            "losses": first.get("losses"),
        })
    return table


def render_stages(table: list[dict]) -> str:
    def num(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = [
        "| stage | real tokens (batches) | wall s | CPU-s | tokens/s wall | tokens per CPU-s | peak RSS MB"
        " | GFLOP per CPU-s | of matmul peak | padding |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in table:
        lines.append(
            f"| {t['stage']} | {t['tokens']} ({t['steps']}) | {t['seconds']:.2f} | {t['cpu_seconds']:.2f} |"
            f" {num(t['tokens_s'], '.0f')} | {num(t['tokens_cpu_s'], '.0f')} | {t['peak_mb']:.0f} |"
            f" {num(t['gflops'], '.1f')} | {num(t['peak_share'], '.0%')} | {num(t['padding'], '.1%')} |"
        )
    return "\n".join(lines)


def peak_line(peaks: dict[str, dict[str, float]], threads: int) -> str:
    return (f"Matmul peak (2048 x 2048, best of 6, before and after the runs, {threads} threads): fp32"
            f" {peaks['float32']['wall']:.1f} GFLOP/s wall, {peaks['float32']['cpu']:.1f} per CPU-s; bf16"
            f" {peaks['bfloat16']['wall']:.1f} GFLOP/s wall, {peaks['bfloat16']['cpu']:.1f} per CPU-s")


def findings(table: list[dict], scit: dict, stage_table: list[dict] | None = None) -> str:
    """The ratios issue 15's targets are about, and the SCIT batching share, as Markdown bullets."""
    by = {t["row"]: t for t in table}
    lines = []
    if "reference" in by and "default" in by:
        ref, default = by["reference"], by["default"]
        speed, memory = default["pairs_s"] / ref["pairs_s"], default["peak_mb"] / ref["peak_mb"]
        cpu_speed = default["pairs_cpu_s"] / ref["pairs_cpu_s"]
        lines.append(f"- fit throughput default / reference = **{speed:.2f}x** wall, **{cpu_speed:.2f}x** per CPU-second"
                     f" (raw: {default['pairs_cpu_s']:.3f} vs {ref['pairs_cpu_s']:.3f} pairs per CPU-s; target >= 5x"
                     f" per CPU-second: {'met' if cpu_speed >= 5 else 'NOT met'})")
        lines.append(f"- fit peak memory default / reference = **{memory:.2f}x** (raw: {default['peak_mb']:.0f} vs"
                     f" {ref['peak_mb']:.0f} MB; target <= 0.5x: {'met' if memory <= 0.5 else 'NOT met'})")
        lines.append(f"- the default fit runs at **{default['peak_share']:.0%}** of the matmul peak in its own FLOPs"
                     f" (target >= 50%: {'met' if default['peak_share'] >= 0.5 else 'NOT met'})")
        if "checkpointing" in by:
            gc = by["checkpointing"]
            lines.append(f"- gradient checkpointing on / off (default off): fit RSS {gc['fit_mb']:.0f} vs {default['fit_mb']:.0f} MB,"
                         f" peak {gc['peak_mb']:.0f} vs {default['peak_mb']:.0f} MB; throughput"
                         f" {gc['pairs_cpu_s'] / default['pairs_cpu_s']:.2f}x per CPU-second")
        work = ref["flops_pair"] / default["flops_pair"]
        lines.append(f"- FLOPs executed per pair, reference / default = {work:.2f}x: the most the default can gain"
                     f" at equal efficiency (it runs at {default['peak_share']:.0%} of the matmul peak, the reference"
                     f" at {ref['peak_share']:.0%}: smaller passes, and the step-1 adapters' small LoRA matmuls)")
        for name in ("bf16", "fp32"):
            if name in by:
                lines.append(f"- {by[name]['label']} / reference: throughput {by[name]['pairs_s'] / ref['pairs_s']:.2f}x wall,"
                             f" {by[name]['pairs_cpu_s'] / ref['pairs_cpu_s']:.2f}x per CPU-second;"
                             f" peak memory {by[name]['peak_mb'] / ref['peak_mb']:.2f}x")
    if scit:
        lines.append(
            f"- SCIT frozen passes of one batch of {scit['examples']} (median of 3, alternating): one batched call"
            f" {scit['batched_s']:.2f} s vs one call per role {scit['separate_s']:.2f} s"
            f" ({scit['separate_s'] / scit['batched_s']:.2f}x); padded tokens {scit['padded_tokens_batched']}"
            f" vs {scit['padded_tokens_separate']}"
        )
    stages = {t["stage"]: t for t in stage_table or []}
    if "step1-preferred" in stages and "trl-sft" in stages:
        ours, trl = stages["step1-preferred"], stages["trl-sft"]
        ratio = ours["tokens_cpu_s"] / trl["tokens_cpu_s"]
        losses = ours["losses"] or trl["losses"]
        loss_note = f"; loss of one batch: rahf {losses[0]:.5f}, TRL {losses[1]:.5f}" if losses else ""
        lines.append(f"- step 1 (Dual, preferred side) / TRL SFTTrainer, same examples and LoRA: **{ratio:.2f}x** per"
                     f" CPU-second (raw: {ours['tokens_cpu_s']:.0f} vs {trl['tokens_cpu_s']:.0f} tokens per CPU-s;"
                     f" target >= 1.0x: {'met' if ratio >= 1 else 'NOT met'}){loss_note}")
    return "\n".join(lines)


def report(command: str, args, workload: dict, body: str, notes: str, peaks: dict, minutes: float, torch_version: str,
           precision: str) -> str:
    return f"""
## Efficiency: the RAHF-Dual pipeline stage by stage (`make bench-efficiency`)

```
{command}
```

Machine: {os.cpu_count()} CPU cores ({cpu_name()}), {args.threads} torch threads, shared with other
jobs (load average at the end {load_average()}), no GPU. torch {torch_version}. Date:
{date.today().isoformat()}. Wall time of the whole bench: {minutes:.1f} min. {peak_line(peaks, args.threads)}.
Our default's precision on this machine: {precision}.

Workload `{args.workload}`: SmolLM2-135M-Instruct (embedded default), Dual, batch {workload['batch']},
prompt window {workload['prompt']}, reply window {workload['reply']}, target layers
{workload['layers'] or 'the default band'}, alpha {workload['alpha']}; the fit rows train one epoch over
{args.pairs} {'built-in' if args.pairs_from == 'builtin' else 'AlpacaEval dev'} pairs ({2 * args.pairs} examples: Dual fits both replies of a pair) after a
warm-up step on one other example. Step-1 adapters are fresh random LoRAs (r 16, all linear
layers). Medians over {args.reps} repetitions; each configuration runs in its own process;
configurations alternate (order reversed every other repetition).

The reference-style row reproduces the reference code's Dual step-2 workload (issue 15, "How it
is measured"): four full models (base for A_o, merged preferred and dispreferred copies, and the
trained copy), every forward through all blocks and the LM head, every role left-padded to the
prompt window and right-padded to the reply window (fixed width), gradient checkpointing on, the
I+ instruction in all three inputs, bf16 autocast with an fp32 trained copy.

Throughput is reported per wall second and per CPU second of the process (user + system time of
all its threads): on a shared, oversubscribed machine the wall clock also measures the other
jobs, the CPU time much less so. "peak RSS" is the process's high-water mark (getrusage, loading
included); "RSS during fit" is the largest psutil sample while the timed epoch runs. "GFLOP per
CPU-s" counts the FLOPs each configuration executes (padding and gradient checkpointing's
recomputation included; formula in `bench/efficiency.py`); "of matmul peak" divides it by the
matmul's GFLOP per CPU-s (the bf16 matmul's for bf16 rows).

The stage table (`bench/stages.py`) times each stage's optimizer steps after the first on the
same pairs: Dual step 1 per side, TRL's `SFTTrainer` on the very same token sequences with the
same LoRA and completion-only loss, SCIT step 1, the targets pass (the frozen passes alone, as
`fit.targets: cached` runs them), and export (merge and save; no FLOPs counted).

{body}

{notes}

Ablations turn one optimisation off from the default. `batch_frozen` batches the roles that
share a model state into one call: in Dual each role has its own state (base, preferred,
dispreferred), so it changes nothing there and is measured on SCIT's frozen passes instead; on
this CPU the batched call is not faster (one long GEMM runs no faster per FLOP than three, and
the shorter `orig` input is padded to the instruction inputs' width); on a GPU fewer, larger
calls usually pay. Step-1 adapters (the default) cost throughput against merged copies (the
adapters' rank-16 matmuls and adds in every linear of the preferred / dispreferred passes) and
buy the memory. Cached targets skip the frozen passes in every epoch after the one that builds
the cache (its build time is shown). bf16 autocast keeps fp32 master weights; it is a precision
change, not an exact optimisation, so the 1e-5 equivalence tests (`tests/test_efficiency.py`)
run in fp32 and bf16 has its own tests there (frozen copies and cached targets get the trained
pass's autocast; alpha 0 with a fresh adapter gives loss exactly 0). `mixed_precision: auto`
turns it on wherever bf16 is native: bf16 GPUs, and CPUs with AVX-512 BF16 or AMX (this one);
`mixed_precision: no` (or `dtype: float32`) keeps fp32.

Tried during development and not adopted (CPU time, median of 8 alternating runs, one batch of
4 Dual examples, same machine): frozen passes under `torch.inference_mode` instead of
`torch.no_grad`, under 1% faster; base, preferred and dispreferred in one PEFT mixed-adapter
batch (`adapter_names`), 7% slower than three calls (PEFT copies each adapter's rows out and
back). Adapter switching itself (`set_adapter` / `disable_adapter`) costs about 0.1 s per batch
here, about 2% of a step.

Scale-out (DDP, FSDP, DeepSpeed ZeRO-2/3 configs in `configs/accelerate/`, checked on 2 CPU ranks):
RELIABILITY.md, "Scale-out".

### GPU check (`bench/gpu_check.py`)

`python bench/gpu_check.py` runs one step of every stage (Dual step 1 both sides, SCIT step 1,
fit with on-the-fly and with cached targets, export) on CUDA in bf16 with a randomly
initialised model shaped like SmolLM2-135M (no downloads), checks that weights, LoRA master
weights, targets and hidden states are where and in the dtype expected, times the Dual fit step
with on-the-fly and cached targets, and prints a JSON summary. Without CUDA it says so and exits
0; `--cpu` runs the same checks on the CPU with a 4-block model. It has not been run on a GPU
yet: no GPU was lent to the task that wrote it.
"""


if __name__ == "__main__":
    sys.exit(main())
