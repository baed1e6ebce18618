"""Step 1a, SCIT: contrastive instruction tuning of one model.

Every pair gives two examples, (I+, x, y+) and (I-, x, y-). For an example (I, x, y) with the
other instruction I', and l(y | I, x) the mean log-likelihood of the reply tokens:

    loss = -l(y | I, x)                                   # LM term
           - (1 - eps) * log(p / (p + q)) - eps * log(q / (p + q))   # contrastive term
    with p = exp l(y | I, x), q = exp l(y | I', x)

averaged over the batch. Both likelihoods use the reply tokens of their own input (the reference
code shifts labels by the instruction-length difference instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rahf.config import AlignConfig
from rahf.data.render import Encoded, encode
from rahf.data.schema import PreferencePair
from rahf.hidden_states import pad_batch, reply_token_logprobs
from rahf.trainer import GuardedTrainer, train_stage, trainable_model, training_arguments

if TYPE_CHECKING:
    from rahf.plan import RunPlan


@dataclass(frozen=True)
class SCITExample:
    matching: Encoded  # reply under the instruction it exemplifies
    swapped: Encoded  # the same reply under the other instruction


def scit_examples(pairs: Sequence[PreferencePair], tokenizer, config: AlignConfig) -> list[SCITExample]:
    good, bad = config.preferred_instruction, config.dispreferred_instruction
    windows = {"max_prompt_tokens": config.max_prompt_tokens, "max_reply_tokens": config.reply_window}
    examples = []
    for pair in pairs:
        for reply, own, other in ((pair.chosen, good, bad), (pair.rejected, bad, good)):
            examples.append(
                SCITExample(
                    encode(tokenizer, pair.prompt, reply, instruction=own, **windows),
                    encode(tokenizer, pair.prompt, reply, instruction=other, **windows),
                )
            )
    return examples


def scit_loss(matching: torch.Tensor, swapped: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """SCIT loss from mean reply log-likelihoods under the matching and the swapped instruction.

    log(p / (p + q)) = l_m - logsumexp(l_m, l_s); (batch,) inputs, scalar output.
    """
    both = torch.stack([matching, swapped], dim=-1)
    log_norm = torch.logsumexp(both, dim=-1)
    contrastive = -(1 - label_smoothing) * (matching - log_norm) - label_smoothing * (swapped - log_norm)
    return (-matching + contrastive).mean()


class SCITCollator:
    """Batch is [matching examples..., swapped examples...] in one padded tensor."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: Sequence[SCITExample]) -> dict[str, torch.Tensor]:
        return pad_batch([e.matching for e in examples] + [e.swapped for e in examples], self.pad_id)


class SCITTrainer(GuardedTrainer):
    label_smoothing = 0.2

    def stage_loss(self, model, inputs: dict) -> torch.Tensor:
        logprobs = reply_token_logprobs(model, inputs)  # (2 * batch, reply_width)
        mean = logprobs.sum(dim=1) / inputs["reply_len"].clamp(min=1)
        matching, swapped = mean.chunk(2)
        return scit_loss(matching, swapped, self.label_smoothing)


def train_scit(plan: RunPlan, pairs: Sequence[PreferencePair], out: Path) -> dict:
    """Train M_s and save it under ``out``: the adapter (LoRA) and always the merged weights,
    which step 3 puts its own adapter on. Returns ``{"log": records, "steps": n}``."""
    config, step1 = plan.config, plan.config.step1
    model = trainable_model(config, plan.model_path, None if step1.full_finetune else step1.lora)
    trainer = SCITTrainer(
        model=model,
        args=training_arguments(config, step1.train, out / "checkpoints", stage="step1-scit"),
        train_dataset=scit_examples(pairs, plan.tokenizer, config),
        data_collator=SCITCollator(plan.tokenizer.pad_token_id),
    )
    trainer.stage = "step1 (scit)"
    trainer.label_smoothing = step1.label_smoothing
    return train_stage(trainer, out, merged=True, tokenizer=plan.tokenizer, model=model)
