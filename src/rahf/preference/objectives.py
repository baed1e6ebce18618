"""Step 1b with ``step1.objective: preference``: each Dual side learns what separates the replies.

The paper's SFT teaches M+ the chosen replies and M- the rejected ones; on data where both reply
sets share most of their style, both sides learn that style and A+ - A- carries little preference
(BENCHMARKS.md, Dual diagnosis). Here M+ is trained with DPO on (chosen over rejected) and M- on
the swapped pair (rejected over chosen), reference = the starting model (adapter disabled), so the
two models differ exactly where the pair does. TRL's ``DPOTrainer`` does the work, driven as the
DPO baseline drives it (:mod:`rahf.baselines.dpo`: rahf's tokenisation and windows, NaN guard),
with step 1's budget, LoRA and ``step1.beta``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from rahf.config import AlignConfig
from rahf.data.schema import PreferencePair


def swapped(pairs: Sequence[PreferencePair]) -> list[PreferencePair]:
    """The pairs with chosen and rejected exchanged: what the dispreferred side prefers."""
    return [dataclasses.replace(p, chosen=p.rejected, rejected=p.chosen) for p in pairs]


def step1_as_baseline(config: AlignConfig) -> AlignConfig:
    """``config`` whose baseline settings are step 1's, for the baseline's DPO builder."""
    baseline = dataclasses.replace(
        config.baseline, train=config.step1.train, lora=config.step1.lora,
        full_finetune=config.step1.full_finetune, beta=config.step1.beta,
    )
    return dataclasses.replace(config, baseline=baseline)


def train_side_preference(
    config: AlignConfig, pairs: Sequence[PreferencePair], tokenizer, side: str, out: Path, *, merged: bool
) -> dict:
    """DPO for one side (swapped pairs for ``dispreferred``); saves ``out/adapter`` (and
    ``out/merged`` with ``merged``) like the SFT side. Returns ``{"log": records, "steps": n}``."""
    from rahf.baselines.dpo import build_dpo_trainer
    from rahf.training import LossLogCallback, save_trained, train_resumably

    data = list(pairs) if side == "preferred" else swapped(pairs)
    trainer = build_dpo_trainer(step1_as_baseline(config), data, tokenizer, out)
    trainer.stage = f"step1 ({side}, preference)"
    log = LossLogCallback()
    trainer.add_callback(log)
    train_resumably(trainer)
    save_trained(trainer.model, out, merged=merged or config.step1.full_finetune, tokenizer=tokenizer)
    return {"log": log.records, "steps": trainer.state.global_step}
