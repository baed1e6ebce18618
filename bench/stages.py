"""The pipeline stage by stage, and step 1 against TRL's SFTTrainer (``bench/efficiency.py --stages``).

Each stage runs in its own process (``efficiency.py --stage NAME``) on the same fixed sample
of built-in pairs: Dual step 1 per side, SCIT step 1, the patterns/targets pass (the frozen
passes alone, as ``fit.targets: cached`` runs them once; ``targets-unshared``: the same with each
reply's pass running its prompt again, as before issue 15's shared prompt), and export (merge + save). The fit
itself is efficiency.py's row table. ``trl-sft`` trains the same examples (token for token,
the same LoRA, the same loss on reply tokens only) with TRL's ``SFTTrainer``; the loss of one
fixed batch is computed by both trainers before timing (:func:`step1_losses`).

FLOPs are analytic (``efficiency.Shape``); step 1 computes the LM head only at the positions
that predict a reply token (``rahf.hidden_states.logits_at``), so it is counted there, forward and
input gradient.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

STAGES = ("step1-preferred", "step1-dispreferred", "trl-sft", "scit-step1", "targets", "targets-unshared", "export")
STEP1_STEPS = 4  # timed optimizer steps per training stage, after one warm-up step


def fixed_window(encoded: Sequence, pad_id: int, prompt_window: int, reply_window: int) -> dict:
    """The reference code's layout: prompt left-padded to ``prompt_window`` tokens, reply
    right-padded to ``reply_window``; every row is ``prompt_window + reply_window`` wide."""
    import torch

    n, width = len(encoded), prompt_window + reply_window
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    lengths = []
    for b, e in enumerate(encoded):
        prompt, reply = list(e.prompt_ids)[-prompt_window:], list(e.reply_ids)[:reply_window]
        input_ids[b, prompt_window - len(prompt) : prompt_window] = torch.tensor(prompt)
        input_ids[b, prompt_window : prompt_window + len(reply)] = torch.tensor(reply)
        mask[b, prompt_window - len(prompt) : prompt_window + len(reply)] = 1
        lengths.append(len(reply))
    return {"input_ids": input_ids, "attention_mask": mask, "reply_start": torch.full((n,), prompt_window),
            "reply_len": torch.tensor(lengths)}


def completion_rows(encoded: Sequence) -> list[dict]:
    """TRL's pre-tokenized form of our step-1 examples: ``input_ids`` and ``completion_mask``."""
    return [{"input_ids": list(e.input_ids), "completion_mask": [0] * len(e.prompt_ids) + [1] * len(e.reply_ids)}
            for e in encoded]


def trl_trainer(model, tokenizer, encoded: Sequence, args):
    """TRL SFTTrainer on the very token sequences rahf trains on, loss on completions only."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    checkpointing = bool(getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False))
    config = SFTConfig(
        output_dir=str(args.output_dir), per_device_train_batch_size=args.per_device_train_batch_size,
        max_steps=args.max_steps, learning_rate=args.learning_rate, lr_scheduler_type=args.lr_scheduler_type,
        warmup_steps=0, weight_decay=args.weight_decay, bf16=args.bf16, use_cpu=args.use_cpu, seed=args.seed,
        data_seed=args.data_seed, report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
        gradient_checkpointing=checkpointing, activation_checkpointing=checkpointing,
        completion_only_loss=True, max_length=None,
        packing=False, padding_free=False, dataloader_num_workers=0, max_grad_norm=args.max_grad_norm,
    )
    return SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(completion_rows(encoded)),
                      processing_class=tokenizer)


def step1_losses(model, tokenizer, encoded: Sequence, args) -> tuple[float, float]:
    """The loss of one batch under rahf's step-1 trainer and under TRL's (eval mode, no grad):
    equal when both train the same objective on the same tokens."""
    import torch

    from rahf.method.step1_dual import ReplyOnlyCollator, ReplySFTTrainer

    rahf = ReplySFTTrainer(model=model, args=args, train_dataset=list(encoded),
                          data_collator=ReplyOnlyCollator(tokenizer.pad_token_id))
    trl = trl_trainer(model, tokenizer, encoded, args)
    rahf_batch = ReplyOnlyCollator(tokenizer.pad_token_id)(list(encoded))
    trl_batch = next(iter(trl.get_train_dataloader())) if len(encoded) <= args.per_device_train_batch_size else None
    if trl_batch is None:
        trl_batch = trl.data_collator(completion_rows(encoded))
    trl_batch = {k: v for k, v in trl_batch.items() if k in ("input_ids", "attention_mask", "labels")}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ours = rahf.compute_loss(model, rahf_batch).item()
            theirs = trl.compute_loss(model, trl_batch).item()
    finally:
        model.train(was_training)
    return ours, theirs


def _timed_training(trainer) -> dict:
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        """CPU and wall time of the optimizer steps after the first (warm-up)."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                self.wall, self.cpu = time.perf_counter(), time.process_time()

    clock = Clock()
    trainer.add_callback(clock)
    trainer.train()
    return {"seconds": time.perf_counter() - clock.wall, "cpu_seconds": time.process_time() - clock.cpu}


def _counting(collator, shapes: list[tuple[int, int, int]], heads: list[int] | None = None):
    """Records each batch's (rows, width, real tokens), and in ``heads`` its reply tokens (the
    positions the LM head runs on). Accelerate's loader fetches one batch
    ahead, so a run cut by ``max_steps`` collates one batch more than it trains: callers take
    ``shapes[1 : 1 + STEP1_STEPS]`` (the timed steps)."""

    def collate(examples):
        batch = collator(examples)
        mask = batch["attention_mask"]
        shapes.append((mask.shape[0], mask.shape[1], int(mask.sum())))
        if heads is not None:
            heads.append(int((batch["labels"] != -100).sum()) if "labels" in batch else int(batch["reply_len"].sum()))
        return batch

    return collate


def run_stage(stage: str, work: Path, config_overrides: list[str], threads: int) -> dict:
    """One stage in this process: timings of the steps after the first, tokens, FLOPs."""
    import torch

    torch.set_num_threads(threads)
    from efficiency import PeakRSS

    with PeakRSS() as rss:
        result = _stage(stage, work, config_overrides)
    result["peak_rss_mb"] = rss.peak / 2**20
    result["stage"] = stage
    return result


def _stage(stage: str, work: Path, overrides: list[str]) -> dict:  # noqa: PLR0915 - one branch per stage
    import torch
    from efficiency import Shape

    from rahf.config import load_config
    from rahf.method.step1_dual import ReplyOnlyCollator, ReplySFTTrainer, sft_examples
    from rahf.models import load_model, load_tokenizer
    from rahf.runs import read_pairs
    from rahf.trainer import add_lora, training_arguments

    base = (work / "base.txt").read_text()
    method = "scit" if stage == "scit-step1" else "dual"
    config = load_config(None, [f"method={method}", f"model={base}", "device=cpu", "report_to=[none]", *overrides])
    tokenizer = load_tokenizer(base)
    pairs = read_pairs(work / "pairs.jsonl")
    train = dataclasses.replace(config.step1.train, max_steps=STEP1_STEPS + 1)
    args = training_arguments(config, train, work / "out" / stage, stage="bench")
    args = dataclasses.replace(args, save_strategy="no", logging_strategy="no", disable_tqdm=True)
    shapes: list[tuple[int, int, int]] = []
    heads: list[int] = []  # LM-head positions per batch (rahf's step 1: reply tokens only)

    if stage in ("step1-preferred", "step1-dispreferred", "trl-sft"):
        side = "dispreferred" if stage == "step1-dispreferred" else "preferred"
        encoded = sft_examples(pairs, tokenizer, config, side)
        torch.manual_seed(0)
        model = add_lora(load_model(base, dtype=config.dtype, device="cpu"), config.step1.lora)
        if stage == "trl-sft":
            losses = step1_losses(model, tokenizer, encoded[: train.batch_size], args)
            trainer = trl_trainer(model, tokenizer, encoded, args)
            trainer.data_collator = _counting(trainer.data_collator, shapes)
        else:
            losses = None
            trainer = ReplySFTTrainer(model=model, args=args, train_dataset=encoded,
                                      data_collator=_counting(ReplyOnlyCollator(tokenizer.pad_token_id), shapes, heads))
        timing = _timed_training(trainer)
        shape = Shape.of(model.config)
        lora = shape.lora(config.step1.lora.r, config.step1.lora.target_modules)
        flops = _step1_flops(shape, lora, shapes, heads)
        return {**timing, **_tokens(shapes[1 : 1 + STEP1_STEPS]), "flops": flops, "bf16": bool(args.bf16), "losses": losses}

    if stage == "scit-step1":
        from rahf.method.step1_scit import SCITCollator, SCITTrainer, scit_examples

        torch.manual_seed(0)
        model = add_lora(load_model(base, dtype=config.dtype, device="cpu"), config.step1.lora)
        trainer = SCITTrainer(model=model, args=args, train_dataset=scit_examples(pairs, tokenizer, config),
                              data_collator=_counting(SCITCollator(tokenizer.pad_token_id), shapes, heads))
        trainer.label_smoothing = config.step1.label_smoothing
        timing = _timed_training(trainer)
        shape = Shape.of(model.config)
        lora = shape.lora(config.step1.lora.r, config.step1.lora.target_modules)
        flops = _step1_flops(shape, lora, shapes, heads)
        return {**timing, **_tokens(shapes[1 : 1 + STEP1_STEPS]), "flops": flops, "bf16": bool(args.bf16), "losses": None}

    # targets and export work on the fit stage's model (fresh step-1 adapters from --prepare)
    from efficiency import split_of, step_flops

    from rahf.method.fit import FitCollator, FitTrainer, compute_cache, load_fit_model
    from rahf.method.patterns import fit_examples, pattern_source
    from rahf.preflight import target_layers
    from rahf.trainer import save_trained

    layers = target_layers(config)
    step1 = {side: str(work / f"step1_{side}") for side in ("preferred", "dispreferred")}
    model, frozen = load_fit_model(config, base, step1, layers)
    shape = Shape.of(model.config)
    if stage == "export":
        started, cpu = time.perf_counter(), time.process_time()
        save_trained(model, work / "out" / "export", merged=True, tokenizer=tokenizer)
        return {"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu,
                "real_tokens": 0, "padded_tokens": 0, "flops": 0.0, "bf16": False, "losses": None}
    examples = fit_examples(pairs, tokenizer, config)
    fit_args = training_arguments(config, config.fit.train, work / "out" / "targets", stage="bench")
    trainer = FitTrainer(model=model, args=fit_args, train_dataset=examples, data_collator=FitCollator(tokenizer.pad_token_id))
    share = stage == "targets"
    trainer.setup_fit(layers=layers, alpha=config.patterns.alpha, source=pattern_source(config), frozen=frozen,
                      pad_id=tokenizer.pad_token_id, truncate=config.fit.truncate_forward,
                      batch_frozen=config.fit.batch_frozen, kl_weight=0.0, share_prompt=share)
    batch_size = config.fit.train.batch_size
    compute_cache(trainer, examples[:batch_size], work / "out" / "warm-cache", batch_size=batch_size)  # warm-up
    collator = FitCollator(tokenizer.pad_token_id)
    splits = []
    for start in range(0, len(examples), batch_size):
        orig = collator(examples[start : start + batch_size])["orig"]
        ids = orig["attention_mask"]
        shapes.append((ids.shape[0], ids.shape[1], int(ids.sum())))
        splits.append(split_of(orig, collator.pad_multiple) if share else None)
    started, cpu = time.perf_counter(), time.process_time()
    compute_cache(trainer, examples, work / "out" / "cache", batch_size=batch_size, dtype=config.fit.cache_dtype)
    timing = {"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu}
    lora = shape.lora(config.step1.lora.r, config.step1.lora.target_modules)
    fit_lora = shape.lora(config.fit.lora.r, config.fit.lora.target_modules)
    flops = sum(step_flops(shape, b, t, top=max(layers), truncate=config.fit.truncate_forward, frozen_lora=lora,
                           fit_lora=fit_lora, frozen_passes=True, trained_pass=False,
                           split=split[0] if split else None, frozen_split=True)
                for (b, t, _), split in zip(shapes, splits, strict=True))
    tokens = _tokens(shapes)
    if share:  # tokens computed: each distinct prompt once, then the replies
        tokens["padded_tokens"] = tokens["real_tokens"] = 0
        for (b, t, n), split in zip(shapes, splits, strict=True):
            (u, p, rows, r), real = split if split else ((b, t, 0, 0), n)
            tokens["padded_tokens"] += u * p + rows * r
            tokens["real_tokens"] += real
    return {**timing, **tokens, "flops": flops, "bf16": bool(fit_args.bf16), "losses": None}


def _step1_flops(shape, lora: int, shapes: Sequence[tuple[int, int, int]], heads: Sequence[int]) -> float:
    """Timed steps' FLOPs: blocks forward and backward, and the LM head (forward and input
    gradient) where it runs: every position (TRL, ``heads`` empty) or the reply tokens (rahf)."""
    timed = shapes[1 : 1 + STEP1_STEPS]
    head_rows = heads[1 : 1 + STEP1_STEPS] if heads else [b * t for b, t, _ in timed]
    return sum(shape.forward(b, t, shape.blocks, lora, rows) + shape.backward(b, t, shape.blocks, lora)
               + 2 * shape.hidden * shape.vocab * rows for (b, t, _), rows in zip(timed, head_rows, strict=True))


def _tokens(shapes: Sequence[tuple[int, int, int]]) -> dict:
    return {"real_tokens": sum(n for *_, n in shapes), "padded_tokens": sum(b * t for b, t, _ in shapes),
            "steps": len(shapes)}
