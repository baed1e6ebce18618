"""Step 1b, Dual: supervised fine-tuning on chosen replies (preferred) and on rejected ones
(dispreferred), loss on reply tokens only.

By default both are LoRA adapters on the one frozen base (``dual_storage: adapters``);
``full-copies`` also writes each merged into a full copy, the reference code's layout.
``step1.objective: preference`` trains each side with DPO instead (:mod:`rahf.method.step1_objectives`).
With ``patterns.align_target: preferred`` the preferred side is also written merged: step 3
aligns M+ itself (:func:`load_preferred_target`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from rahf.config import AlignConfig
from rahf.data.render import Encoded, encode
from rahf.data.schema import PreferencePair
from rahf.hidden_states import logits_at, pad_batch
from rahf.trainer import GuardedTrainer, add_lora, train_stage, trainable_model, training_arguments

Side = Literal["preferred", "dispreferred"]

if TYPE_CHECKING:
    from rahf.plan import RunPlan


def sft_examples(
    pairs: Sequence[PreferencePair], tokenizer, config: AlignConfig, side: Side
) -> list[Encoded]:
    """(prompt, reply) with no instruction: chosen replies for preferred, rejected for dispreferred."""
    return [
        encode(
            tokenizer,
            pair.prompt,
            pair.chosen if side == "preferred" else pair.rejected,
            max_prompt_tokens=config.max_prompt_tokens,
            max_reply_tokens=config.reply_window,
        )
        for pair in pairs
    ]


class ReplyOnlyCollator:
    """Pads a batch; labels are -100 everywhere but on reply tokens."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        batch = pad_batch(examples, self.pad_id)
        positions = torch.arange(batch["input_ids"].shape[1])[None, :]
        start = batch["reply_start"][:, None]
        is_reply = (positions >= start) & (positions < start + batch["reply_len"][:, None])
        labels = torch.where(is_reply, batch["input_ids"], torch.full_like(batch["input_ids"], -100))
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}


def reply_sft_loss(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean negative log-likelihood over the batch's label tokens (those not -100).

    The causal-LM loss of Hugging Face models (shifted labels, token mean), with the LM head run
    only at the positions that predict a label: a reply is a small share of each row.
    """
    labels = inputs["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100  # position p predicts token p + 1
    logits = logits_at(model, inputs, keep).float()
    return torch.nn.functional.cross_entropy(logits, labels[:, 1:][keep[:, :-1]])


class ReplySFTTrainer(GuardedTrainer):
    """Step 1b's trainer: :func:`reply_sft_loss` on :class:`ReplyOnlyCollator` batches."""

    def stage_loss(self, model, inputs: dict) -> torch.Tensor:
        return reply_sft_loss(model, inputs)


def train_side(plan: RunPlan, pairs: Sequence[PreferencePair], side: Side, out: Path) -> dict:
    """Fine-tune one side and save it under ``out``; returns ``{"log": records, "steps": n}``."""
    config, step1 = plan.config, plan.config.step1
    merged = step1.dual_storage == "full-copies" or (side == "preferred" and config.patterns.align_target == "preferred")
    if step1.objective == "preference":
        from rahf.method.step1_objectives import train_side_preference

        return train_side_preference(plan, pairs, side, out, merged=merged)
    model = trainable_model(config, plan.model_path, None if step1.full_finetune else step1.lora)
    trainer = ReplySFTTrainer(
        model=model,
        args=training_arguments(config, step1.train, out / "checkpoints", stage=f"step1-{side}"),
        train_dataset=sft_examples(pairs, plan.tokenizer, config, side),
        data_collator=ReplyOnlyCollator(plan.tokenizer.pad_token_id),
    )
    trainer.stage = f"step1 ({side})"
    return train_stage(trainer, out, merged=merged or step1.full_finetune, tokenizer=plan.tokenizer, model=model)


def load_preferred_target(plan: RunPlan, base_path: str, step1: dict[str, str]):
    """``patterns.align_target: preferred``: the model step 3 trains is M+ (``base_path``, the
    merged preferred side) with a fresh adapter, as in the reference code.

    Frozen states: M+ itself is the aligned model with its new adapter disabled (A_o, fed I+ as
    system prompt, and A_+); M- is a separate frozen copy (its merged weights, or the base with
    its adapter merged in). Returns ``(model, ModelStates)`` like ``rahf.method.fit.load_fit_model``.
    """
    from peft import PeftModel

    from rahf.method.patterns import ModelStates

    config = plan.config
    model = add_lora(plan.load_model(base_path), config.fit.lora, blocks=range(max(plan.layers)))
    folder = Path(step1["dispreferred"])
    if (folder / "merged").is_dir():
        minus = plan.load_model(str(folder / "merged"))
    else:
        minus = PeftModel.from_pretrained(plan.load_model(), str(folder / "adapter")).merge_and_unload()
    minus.eval().requires_grad_(False)
    return model, ModelStates(model, {"dispreferred": minus})
