"""DPO baseline: TRL ``DPOTrainer`` on (prompt, chosen, rejected), reference = the starting model.

For a pair (x, y+, y-) with summed reply log-probs log pi(y | x) (EOS included):

    r(y)  = beta * (log pi(y | x) - log pi_ref(y | x))        # implicit reward
    loss  = -log sigmoid(r(y+) - r(y-))                       # averaged over the batch

``loss_type: sigmoid_norm`` divides each reply's summed log-ratio by its token count first, so a
longer reply weighs no more than a short one; its beta is per token (about reply length x the
summed loss's beta gives the same first step). ``sft_weight`` > 0 adds that weight x the chosen
reply's mean per-token NLL (RPO). At the start pi == pi_ref, so the first loss is log 2 ~= 0.6931. TRL logs ``rewards/chosen``,
``rewards/rejected``, ``rewards/accuracies`` (share with r(y+) > r(y-)) and ``rewards/margins``.

The reference is never a second copy with LoRA: TRL computes it with the adapter disabled.
``precompute_ref_log_probs`` (rahf baseline dpo) makes TRL compute it once over the training set before
training (supported with PEFT in TRL 1.16: adapter disabled then too), when training reads every
pair (:func:`reads_every_pair`); a shorter budget computes it per batch instead.

Data reach TRL in its conversational preference format (``prompt`` messages, ``chosen`` /
``rejected`` as one assistant message each). TRL 1.16 has no pre-tokenised input for DPO and
only a total ``max_length`` cut from the end, so :class:`GuardedDPOTrainer` overrides its
``_prepare_dataset`` to tokenise with :func:`rahf.data.render.encode_prompt` /
``encode_reply``: the same tokens and windows (prompt keeps its newest turns within
``max_prompt_tokens``; each reply its first ``reply_window`` tokens) as align and ``rahf eval``.
On a ChatML template TRL's own tokenisation differs only by the newline after ``<|im_end|>``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from rahf import console
from rahf.baselines import FiniteLoss, train_and_save, trl_arguments
from rahf.config import BaselineConfig, RunConfig, Step1Config, TrainSettings
from rahf.data.render import encode_prompt, encode_reply
from rahf.data.schema import PreferencePair
from rahf.io import is_main_process
from rahf.models import load_model
from rahf.trainer import lora_config


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

    def __init__(self, *args, max_prompt_tokens: int, max_reply_tokens: int, shared_length: bool = False, **kwargs) -> None:
        # Set before DPOTrainer.__init__, which tokenises the datasets through _prepare_dataset.
        self.windows, self.shared_length = (max_prompt_tokens, max_reply_tokens), shared_length
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset: Dataset, processing_class, args: DPOConfig, dataset_name: str) -> Dataset:
        """Replace TRL's chat-template tokenisation with rahf's (same columns TRL's collator reads)."""
        max_prompt, max_reply = self.windows

        def tokenize(row: dict) -> dict:
            prompt_ids, _ = encode_prompt(
                processing_class, row["prompt"], max_prompt_tokens=max_prompt, origin=row.get("origin", "")
            )
            chosen, rejected = (
                encode_reply(processing_class, row[key][-1]["content"], max_reply_tokens=max_reply)[0]
                for key in ("chosen", "rejected")
            )
            if self.shared_length:
                chosen, rejected = shared_length(chosen, rejected, processing_class.eos_token_id)
            return {"prompt_ids": prompt_ids, "chosen_ids": chosen, "rejected_ids": rejected}

        return dataset.map(tokenize, remove_columns=dataset.column_names, desc=f"Tokenizing {dataset_name} pairs")


def shared_length(chosen: list[int], rejected: list[int], eos_id: int | None) -> tuple[list[int], list[int]]:
    """Both replies cut to the shorter one's length, less its end-of-reply token.

    Why: in a reply window, a pair's replies often differ in where they stop (in the quality
    bench's AlpacaEval training pairs only the rejected reply ends inside 64 tokens in 24 %, only
    the chosen one in 5 %), and DPO learns "do not stop" from that as readily as anything the
    replies say; cut this way, both replies are unfinished and equally long (LD-DPO with its
    weight 0 on the longer reply's extra tokens, also without the shorter one's end token).
    """
    n = min(len(chosen), len(rejected))
    if n and eos_id is not None and eos_id in (chosen[n - 1], rejected[n - 1]):
        n -= 1
    n = max(n, 1)  # an empty reply (its end token alone): keep one token each
    return chosen[:n], rejected[:n]


def reads_every_pair(train: TrainSettings, pairs: int, world_size: int = 1) -> bool:
    """Whether training reads every pair at least once. Only then does precomputing the reference
    log-probs pay: with fewer steps it would run the reference on pairs training never reads (Dual
    step 1 with the preference objective spent most of the quality bench's budget there)."""
    if train.max_steps > 0:
        return train.max_steps * train.batch_size * train.grad_accum * world_size >= pairs
    return train.epochs >= 1


def build_dpo_trainer(
    config: RunConfig, pairs: Sequence[PreferencePair], tokenizer, out: Path, *,
    settings: BaselineConfig | Step1Config | None = None, precompute_ref_log_probs: bool | None = None,
    model_path: str | None = None,
) -> DPOTrainer:
    """The trainer, ready to ``train()`` (reference log-probs already computed if precomputed).

    ``settings``: where the DPO settings are read (train, lora / full_finetune, beta, loss_type,
    sft_weight, shared_length); default the baseline's own (``config``), Dual step 1 with
    ``step1.objective: preference`` passes ``config.step1``. ``precompute_ref_log_probs``
    defaults to the baseline's setting. ``model_path``: the model already resolved (default:
    ``config.model``).
    """
    settings = settings or config
    train, lora = settings.train, None if settings.full_finetune else settings.lora
    if precompute_ref_log_probs is None:
        precompute_ref_log_probs = config.precompute_ref_log_probs
    if precompute_ref_log_probs and not reads_every_pair(train, len(pairs), int(os.environ.get("WORLD_SIZE", "1"))):
        if is_main_process():
            console.info(f"rahf: dpo: the step budget reads fewer than the {len(pairs)} pairs: reference"
                         " log-probs are computed per batch, not up front for every pair")
        precompute_ref_log_probs = False
    model = load_model(model_path or config.model, dtype=config.dtype, device=config.device)
    args = trl_arguments(
        config, DPOConfig, out / "checkpoints", stage="dpo", train=train,
        beta=settings.beta,
        # RPO: the DPO loss plus sft_weight x the chosen reply's mean NLL (TRL's "sft" loss)
        loss_type=[settings.loss_type, "sft"] if settings.sft_weight else [settings.loss_type],
        loss_weights=[1.0, settings.sft_weight] if settings.sft_weight else None,
        precompute_ref_log_probs=precompute_ref_log_probs,
        max_length=None,  # the windows are applied per prompt and per reply in _prepare_dataset
    )
    return GuardedDPOTrainer(
        model=model,
        args=args,
        train_dataset=preference_dataset(pairs),
        processing_class=tokenizer,
        peft_config=None if lora is None else lora_config(lora),
        max_prompt_tokens=config.max_prompt_tokens,
        max_reply_tokens=config.reply_window,
        shared_length=settings.shared_length,
    )


def dpo_stage(config: BaselineConfig, pairs: Sequence[PreferencePair], tokenizer, out: Path, *, model_path: str | None = None) -> list[dict]:
    """Train (resuming from ``out/checkpoints``), save ``out/adapter`` or ``out/model``; return the log."""
    return train_and_save(build_dpo_trainer(config, pairs, tokenizer, out, model_path=model_path), out, tokenizer)
