"""Gradient accumulation averages micro-batch losses in every rahf training stage."""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import TrainingArguments

from rahf.testing import tiny_model
from rahf.trainer import GuardedTrainer


def one_sgd_step(tmp_path, batch: int, accum: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(3, 300, (8, 12))  # equal lengths: the mean of two means of 2 is the mean of 4
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    model = tiny_model(layers=2)
    args = TrainingArguments(
        output_dir=str(tmp_path / f"b{batch}a{accum}"), per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum, max_steps=1, learning_rate=0.5, optim="sgd",
        lr_scheduler_type="constant", max_grad_norm=1e9, report_to=[], save_strategy="no", seed=0,
        use_cpu=True, logging_steps=1, disable_tqdm=True,
    )
    GuardedTrainer(model=model, args=args, train_dataset=data).train()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_accumulated_step_equals_the_large_batch_step(tmp_path):
    start = {name: p.detach().clone() for name, p in tiny_model(layers=2).named_parameters()}
    large = one_sgd_step(tmp_path, batch=4, accum=1)
    accumulated = one_sgd_step(tmp_path, batch=2, accum=2)
    moved = max((large[n] - start[n]).abs().max().item() for n in start)
    assert moved > 1e-3  # the step did something to compare
    for name in start:  # summing the two means instead would move every weight twice as far
        torch.testing.assert_close(accumulated[name] - start[name], large[name] - start[name], atol=1e-6, rtol=1e-4)
