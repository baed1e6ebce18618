"""DPO baseline: TRL ``DPOTrainer`` on (prompt, chosen, rejected), reference = the starting model.

For a pair (x, y+, y-) with summed reply log-probs log pi(y | x) (EOS included):

    r(y)  = beta * (log pi(y | x) - log pi_ref(y | x))        # implicit reward
    loss  = -log sigmoid(r(y+) - r(y-))                       # averaged over the batch

At the start pi == pi_ref, so the first loss is log 2 ~= 0.6931. TRL logs ``rewards/chosen``,
``rewards/rejected``, ``rewards/accuracies`` (share with r(y+) > r(y-)) and ``rewards/margins``.

The reference is never a second copy with LoRA: TRL computes it with the adapter disabled.
``baseline.precompute_ref_log_probs`` makes TRL compute it once over the training set before
training (supported with PEFT in TRL 1.16: adapter disabled then too).

Data reach TRL in its conversational preference format (``prompt`` messages, ``chosen`` /
``rejected`` as one assistant message each). TRL 1.16 has no pre-tokenised input for DPO and
only a total ``max_length`` cut from the end, so :class:`GuardedDPOTrainer` overrides its
``_prepare_dataset`` to tokenise with :func:`rahf.data.render.encode_prompt` /
``encode_reply``: the same tokens and windows (prompt keeps its newest turns within
``max_prompt_tokens``; each reply its first ``reply_window`` tokens) as align and ``rahf eval``.
On a ChatML template TRL's own tokenisation differs only by the newline after ``<|im_end|>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from rahf.baselines import FiniteLoss, train_and_save, trl_arguments
from rahf.config import AlignConfig
from rahf.data.render import encode_prompt, encode_reply
from rahf.data.schema import PreferencePair
from rahf.models import load_model
from rahf.training import lora_config


def preference_dataset(pairs: Sequence[PreferencePair]) -> Dataset:
    """TRL's conversational preference format; ``origin`` names the pair in errors."""
    return Dataset.from_list([
        {
            "prompt": [dict(m) for m in pair.prompt],
            "chosen": [{"role": "assistant", "content": pair.chosen}],
            "rejected": [{"role": "assistant", "content": pair.rejected}],
            "origin": pair.origin,
        }
        for pair in pairs
    ])


class GuardedDPOTrainer(FiniteLoss, DPOTrainer):
    """``DPOTrainer`` with rahf's tokenisation and a stop on non-finite losses."""

    stage = "dpo"

    def __init__(self, *args, max_prompt_tokens: int, max_reply_tokens: int, **kwargs) -> None:
        # Set before DPOTrainer.__init__, which tokenises the datasets through _prepare_dataset.
        self.windows = (max_prompt_tokens, max_reply_tokens)
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset: Dataset, processing_class, args: DPOConfig, dataset_name: str) -> Dataset:
        """Replace TRL's chat-template tokenisation with rahf's (same columns TRL's collator reads)."""
        max_prompt, max_reply = self.windows

        def tokenize(row: dict) -> dict:
            prompt_ids, _ = encode_prompt(
                processing_class, row["prompt"], max_prompt_tokens=max_prompt, origin=row.get("origin", "")
            )
            replies = {
                key: encode_reply(processing_class, row[key][-1]["content"], max_reply_tokens=max_reply)[0]
                for key in ("chosen", "rejected")
            }
            return {"prompt_ids": prompt_ids, "chosen_ids": replies["chosen"], "rejected_ids": replies["rejected"]}

        return dataset.map(tokenize, remove_columns=dataset.column_names, desc=f"Tokenizing {dataset_name} pairs")


def build_dpo_trainer(config: AlignConfig, pairs: Sequence[PreferencePair], tokenizer, out: Path) -> DPOTrainer:
    """The trainer, ready to ``train()`` (reference log-probs already computed if precomputed)."""
    model = load_model(config.model, dtype=config.dtype, device=config.device)
    settings = config.baseline
    args = trl_arguments(
        config, DPOConfig, out / "checkpoints", stage="dpo",
        beta=settings.beta,
        precompute_ref_log_probs=settings.precompute_ref_log_probs,
        max_length=None,  # the windows are applied per prompt and per reply in _prepare_dataset
    )
    return GuardedDPOTrainer(
        model=model,
        args=args,
        train_dataset=preference_dataset(pairs),
        processing_class=tokenizer,
        peft_config=None if settings.full_finetune else lora_config(settings.lora),
        max_prompt_tokens=config.max_prompt_tokens,
        max_reply_tokens=config.reply_window,
    )


def dpo_stage(config: AlignConfig, pairs: Sequence[PreferencePair], tokenizer, out: Path) -> list[dict]:
    """Train (resuming from ``out/checkpoints``), save ``out/adapter`` or ``out/model``; return the log."""
    return train_and_save(build_dpo_trainer(config, pairs, tokenizer, out), out, tokenizer)
