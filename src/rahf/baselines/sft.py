"""SFT baseline: TRL ``SFTTrainer`` on (prompt, chosen), loss on the reply tokens only.

    loss = -(1 / N) * sum over reply tokens t of log p(y+_t | x, y+_<t)

with N the number of reply tokens in the batch (TRL's token-mean NLL).

Each example is in TRL's conversational prompt-completion format (``prompt`` = our chat
messages, ``completion`` = the chosen reply as an assistant message) and arrives already
tokenised by :func:`rahf.data.render.encode` (``input_ids`` + ``completion_mask``). TRL then
skips its own tokenisation (a documented path for ``input_ids`` datasets) and turns
``completion_mask`` into labels, so the tokens are exactly those ``rahf align`` trains and
``rahf eval`` scores, with the same prompt and reply windows; ``max_length`` is off.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from rahf.baselines import FiniteLoss, train_and_save, trl_arguments
from rahf.config import BaselineConfig
from rahf.data.render import encode
from rahf.data.schema import PreferencePair
from rahf.models import load_model
from rahf.trainer import lora_config


class GuardedSFTTrainer(FiniteLoss, SFTTrainer):
    stage = "sft"


def sft_dataset(pairs: Sequence[PreferencePair], tokenizer, config: BaselineConfig) -> Dataset:
    """One example per pair: the prompt and its chosen reply, tokenised as align does."""
    rows = []
    for pair in pairs:
        encoded = encode(
            tokenizer, pair.prompt, pair.chosen, max_prompt_tokens=config.max_prompt_tokens,
            max_reply_tokens=config.reply_window, origin=pair.origin,
        )
        rows.append({
            "prompt": [dict(m) for m in pair.prompt],
            "completion": [{"role": "assistant", "content": pair.chosen}],
            "input_ids": encoded.input_ids,
            # 0 on prompt tokens, 1 on reply tokens (EOS included): TRL's label mask
            "completion_mask": [0] * len(encoded.prompt_ids) + [1] * len(encoded.reply_ids),
        })
    return Dataset.from_list(rows)


def build_sft_trainer(
    config: BaselineConfig, pairs: Sequence[PreferencePair], tokenizer, out: Path, *, model_path: str | None = None
) -> SFTTrainer:
    """The trainer, ready to ``train()``: LoRA from ``lora`` unless ``full_finetune``.
    ``model_path``: the model already resolved (default: ``config.model``)."""
    model = load_model(model_path or config.model, dtype=config.dtype, device=config.device)
    settings = config
    args = trl_arguments(
        config, SFTConfig, out / "checkpoints", stage="sft",
        max_length=None,  # encode() already applied the windows
        completion_only_loss=True,
    )
    return GuardedSFTTrainer(
        model=model,
        args=args,
        train_dataset=sft_dataset(pairs, tokenizer, config),
        processing_class=tokenizer,
        peft_config=None if settings.full_finetune else lora_config(settings.lora),
    )


def sft_stage(config: BaselineConfig, pairs: Sequence[PreferencePair], tokenizer, out: Path, *, model_path: str | None = None) -> list[dict]:
    """Train (resuming from ``out/checkpoints``), save ``out/adapter`` or ``out/model``; return the log."""
    return train_and_save(build_sft_trainer(config, pairs, tokenizer, out, model_path=model_path), out, tokenizer)
