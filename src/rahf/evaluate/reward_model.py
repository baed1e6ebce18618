"""``rahf train-rm``: train a small reward model with TRL's RewardTrainer, since none can be downloaded.

The backbone (default: the embedded SmolLM2-135M) becomes an ``AutoModelForSequenceClassification``
with one output; training minimises the Bradley-Terry loss ``-log sigmoid(r(x, y+) - r(x, y-))``.
Either LoRA on every linear layer plus a fully trained score head (``lora``), or the score head
alone on a frozen backbone (``head-only``: no backward pass through the backbone, several times
faster on a CPU, weaker). Pairs are split into train / validation *by prompt*
(``rahf.data.split_pairs``), so no validation prompt was seen in training.

Inputs are pre-tokenised with ``rahf.evaluate.reward.reward_input_ids`` -- the same layout and
truncation used when the RM scores replies later. The saved folder is a plain transformers
checkpoint (LoRA merged), loadable by ``AutoModelForSequenceClassification.from_pretrained`` and
by ``rahf eval --reward-model``. ``metrics.json`` holds held-out pairwise accuracy and, for
context, the accuracy of the rule "the longer reply wins" on the same validation pairs.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

import torch

from rahf.config import ConfigError
from rahf.data import load_preferences, split_pairs
from rahf.data.schema import DataError, PreferencePair
from rahf.evaluate.report import environment
from rahf.evaluate.reward import RewardModel, pairwise_accuracy, reward_input_ids
from rahf.evaluate.settings import RewardModelConfig
from rahf.hidden_states import decoder_blocks
from rahf.io import atomic_dir, atomic_write_json, file_digest
from rahf.models import load_tokenizer, resolve_model_path


def _tokenised(tokenizer, pairs: list[PreferencePair], config: RewardModelConfig):
    from datasets import Dataset

    def ids(pair: PreferencePair, reply: str) -> list[int]:
        return reward_input_ids(
            tokenizer, pair.prompt, reply, max_length=config.max_length, max_reply_tokens=config.max_reply_tokens
        )

    return Dataset.from_list(
        [{"chosen_ids": ids(p, p.chosen), "rejected_ids": ids(p, p.rejected)} for p in pairs]
    )


def _backbone(config: RewardModelConfig, tokenizer):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(config.seed)  # the score head starts random
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(config.model), num_labels=1, dtype=torch.float32
    )
    # The classifier reads the last non-pad token; without a pad id it refuses batches > 1.
    model.config.pad_token_id = tokenizer.pad_token_id
    if config.method == "head-only":
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith("score")
        return model, None
    from peft import LoraConfig

    return model, LoraConfig(
        task_type="SEQ_CLS",
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        target_modules=_lora_targets(model, config.lora_layers),
        exclude_modules=["score"],
        modules_to_save=["score"],
    )


def _lora_targets(model, top_blocks: int | None) -> str | list[str]:
    """Every linear layer, or (``top_blocks``) the full names of those in the last N blocks.

    With adapters only near the top, no gradient flows below them: a step costs about one
    forward pass plus the top blocks' backward.
    """
    if top_blocks is None:
        return "all-linear"
    blocks = list(decoder_blocks(model))
    if top_blocks > len(blocks):
        raise ConfigError(f"lora_layers={top_blocks} but the model has {len(blocks)} blocks")
    inside = {id(m) for block in blocks[-top_blocks:] for m in block.modules()}
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and id(m) in inside]


def train_reward_model(config: RewardModelConfig) -> dict:
    """Train, evaluate on held-out prompts, save the merged RM and metrics.json; return metrics."""
    from trl import RewardConfig, RewardTrainer

    from rahf.config import TrainSettings
    from rahf.trainer import trainer_arguments

    started = time.time()
    loaded = load_preferences(config.data, format=config.data_format, skip_invalid=config.skip_invalid,
                              limit=config.limit, columns=config.columns)
    train_pairs, val_pairs = split_pairs(loaded.pairs, validation_fraction=config.validation_fraction,
                                         seed=config.seed)
    if not train_pairs or not val_pairs:
        raise DataError(
            f"{config.data}: {len(loaded.pairs)} pairs split into {len(train_pairs)} train /"
            f" {len(val_pairs)} validation; use more pairs or another validation fraction"
        )
    tokenizer = load_tokenizer(config.model)
    model, peft_config = _backbone(config, tokenizer)
    work = Path(tempfile.mkdtemp(prefix="rahf-train-rm-"))
    cuda = torch.cuda.is_available()
    budget = TrainSettings(learning_rate=config.lr, epochs=config.epochs, max_steps=config.max_steps,
                           batch_size=config.batch_size, grad_accum=config.grad_accum, lr_scheduler="linear")
    args = trainer_arguments(  # the one Trainer-arguments builder (rahf.trainer)
        budget, work, cls=RewardConfig, seed=config.seed, bf16=cuda and torch.cuda.is_bf16_supported(),
        use_cpu=not cuda, logging_steps=10, save_strategy="no", remove_unused_columns=True,
        max_length=None,  # inputs are already cut to config.max_length
        disable_tqdm=not config.progress,
    )
    train_started = time.time()
    try:
        trainer = RewardTrainer(
            model=model,
            args=args,
            train_dataset=_tokenised(tokenizer, train_pairs, config),
            processing_class=tokenizer,
            peft_config=peft_config,
        )
        output = trainer.train()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    trained = trainer.model
    if peft_config is not None:
        trained = trained.merge_and_unload()
    trained.eval()
    train_seconds = time.time() - train_started  # tokenising (by TRL) and training
    held_out = pairwise_accuracy(
        RewardModel(trained, tokenizer, config.out), val_pairs, max_length=config.max_length,
        max_reply_tokens=config.max_reply_tokens, resamples=config.resamples, seed=config.seed,
        progress=config.progress,
    )
    metrics = {
        "validation_accuracy": held_out["accuracy"],
        "longer_wins_accuracy": held_out["longer_wins_accuracy"],
        "validation_mean_margin": held_out["mean_margin"],
        "n_train": len(train_pairs),
        "n_validation": len(val_pairs),
        "invalid_rows": loaded.invalid,
        "steps": output.global_step,
        "train_loss": output.training_loss,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - started, 1),
        "learning_rate": config.lr,
        "config": dataclasses.asdict(config),
        "data_sha256": file_digest(config.data) if Path(config.data).is_file() else None,
        "environment": environment(),
    }

    def build(folder: Path) -> None:
        trained.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        atomic_write_json(folder / "metrics.json", metrics)

    atomic_dir(config.out, build)
    return metrics
