"""Step 1b with ``step1.objective: preference``: each Dual side learns what separates the replies.

The paper's SFT teaches M+ the chosen replies and M- the rejected ones; on data where both reply
sets share most of their style, both sides learn that style and A+ - A- carries little preference
(BENCHMARKS.md, Dual diagnosis). Here M+ is trained with DPO on (chosen over rejected) and M- on
the swapped pair (rejected over chosen), reference = the starting model (adapter disabled), so the
two models differ exactly where the pair does. TRL's ``DPOTrainer`` does the work, driven as the
DPO baseline drives it (:mod:`rahf.baselines.dpo`: rahf's tokenisation and windows, NaN guard),
with step 1's budget, LoRA, ``step1.beta``, ``step1.loss_type`` and ``step1.sft_weight``
(the NLL term then reads each side's own preferred reply: chosen for M+, rejected for M-).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rahf.data.schema import PreferencePair

# Reference log-probs computed once before training, as the DPO baseline does by default.
STEP1_PRECOMPUTE_REF = True

if TYPE_CHECKING:
    from rahf.plan import RunPlan


def swapped(pairs: Sequence[PreferencePair]) -> list[PreferencePair]:
    """The pairs with chosen and rejected exchanged: what the dispreferred side prefers."""
    return [dataclasses.replace(p, chosen=p.rejected, rejected=p.chosen) for p in pairs]


def train_side_preference(plan: RunPlan, pairs: Sequence[PreferencePair], side: str, out: Path, *, merged: bool) -> dict:
    """DPO for one side (swapped pairs for ``dispreferred``); saves ``out/adapter`` (and
    ``out/merged`` with ``merged``) like the SFT side. Returns ``{"log": records, "steps": n}``."""
    from rahf.baselines.dpo import build_dpo_trainer
    from rahf.trainer import train_stage

    config, step1 = plan.config, plan.config.step1
    data = list(pairs) if side == "preferred" else swapped(pairs)
    trainer = build_dpo_trainer(
        config, data, plan.tokenizer, out, settings=step1, precompute_ref_log_probs=STEP1_PRECOMPUTE_REF,
        model_path=plan.model_path,
    )
    trainer.stage = f"step1 ({side}, preference)"
    return train_stage(trainer, out, merged=merged or step1.full_finetune, tokenizer=plan.tokenizer)
