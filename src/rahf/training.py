"""What every training stage shares: Trainer arguments, LoRA wrapping, resume, NaN guard.

All stages run on ``transformers.Trainer`` so bf16, gradient checkpointing, gradient
accumulation, ``report_to`` logging and ``accelerate launch`` (DDP, DeepSpeed) work unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from rahf.config import AlignConfig, LoraSettings, TrainSettings


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says where it stopped."""


def lora_config(settings: LoraSettings, *, blocks: Sequence[int] | None = None) -> LoraConfig:
    """PEFT LoRA config; ``blocks`` limits it to those 0-based decoder blocks."""
    targets = settings.target_modules
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        layers_to_transform=list(blocks) if blocks is not None else None,
        task_type="CAUSAL_LM",
    )


def add_lora(
    model, settings: LoraSettings, *, name: str = "default", blocks: Sequence[int] | None = None
) -> PeftModel:
    """Wrap ``model`` with a new trainable adapter (or add one to a PeftModel).

    Adapters that get saved are called "default": PEFT writes other names into sub-folders.
    """
    config = lora_config(settings, blocks=blocks)
    if isinstance(model, PeftModel):
        model.add_adapter(name, config)
        model.set_adapter(name)
        return model
    return get_peft_model(model, config, adapter_name=name)


def use_bf16(config: AlignConfig) -> bool:
    """bf16 autocast with fp32 master weights: on bf16 GPUs by default, on CPU when asked."""
    if config.mixed_precision != "auto":
        return config.mixed_precision == "bf16"
    return config.dtype != "float32" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def training_arguments(
    config: AlignConfig, train: TrainSettings, output_dir: Path, *, stage: str
) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        learning_rate=train.learning_rate,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        warmup_steps=train.warmup_ratio,  # transformers 5: a float < 1 is a ratio
        lr_scheduler_type=train.lr_scheduler,
        weight_decay=train.weight_decay,
        logging_steps=config.logging_steps,
        save_steps=config.save_steps,
        save_total_limit=2,
        save_strategy="steps",
        report_to=config.report_to,
        run_name=f"{Path(config.run_dir).name}-{stage}",
        seed=config.seed,
        data_seed=config.seed,
        bf16=use_bf16(config),
        gradient_checkpointing=config.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
        use_cpu=(config.device == "cpu") or not torch.cuda.is_available(),
    )


def check_finite(loss: torch.Tensor, trainer: Trainer, stage: str) -> None:
    """Stop the run at the first NaN/inf loss, keeping the last good checkpoint on disk."""
    if not torch.isfinite(loss.detach()).all():
        step = trainer.state.global_step + 1
        last = get_last_checkpoint(trainer.args.output_dir) if Path(trainer.args.output_dir).is_dir() else None
        where = f"; last good checkpoint: {last}" if last else "; no checkpoint was saved yet"
        raise TrainingError(f"{stage}: loss became {float(loss.detach().float().mean())} at step {step}{where}")


class LossLogCallback(TrainerCallback):
    """Collect the training log so each stage can write metrics.jsonl and a loss curve."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and math.isfinite(logs["loss"]):
            self.records.append({"step": state.global_step, **logs})


def train_resumably(trainer: Trainer) -> None:
    """Train, resuming from the newest checkpoint in the output folder if there is one."""
    out = Path(trainer.args.output_dir)
    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    if last:
        print(f"rahf: resuming from {last}")
    trainer.train(resume_from_checkpoint=last)


class GuardedTrainer(Trainer):
    """``Trainer`` that stops on a non-finite loss. Subclasses override :meth:`stage_loss`."""

    stage = "train"

    def stage_loss(self, model, inputs: dict) -> torch.Tensor:
        return super().compute_loss(model, inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = self.stage_loss(model, inputs)
        check_finite(loss, self, self.stage)
        return loss


def save_trained(model, out: Path, *, merged: bool, tokenizer=None) -> None:
    """Write the adapter (``out/adapter``) or full weights (``out/model``) atomically.

    With ``merged`` a LoRA model is also written merged into its base (``out/merged``), for the
    layouts that need plain weights.
    """
    from rahf.io import atomic_dir

    if isinstance(model, PeftModel):
        atomic_dir(out / "adapter", lambda tmp: model.save_pretrained(tmp, selected_adapters=["default"]))
        if merged:
            def build(tmp: Path) -> None:
                model.merge_and_unload().save_pretrained(tmp)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)

            atomic_dir(out / "merged", build)
    else:
        def build_full(tmp: Path) -> None:
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)

        atomic_dir(out / ("merged" if merged else "model"), build_full)
