"""On-policy anchor of the fit (``fit.anchor_weight``, beyond the paper): keep the fitted model's
next-token distribution near the frozen model's along the frozen model's own replies.

Why: ``fit.kl_weight`` and ``fit.stop_weight`` are read on the pairs' replies, which people or
other models wrote. On the quality bench they held the next-token distribution on held-out human
replies, yet the replies the aligned model generated for hh prompts still grew by 24-39 %: the
drift happens along the model's own trajectory, where those replies never go. This term is read
where generation goes. It is KL(frozen || trained) of the next token at every position of the
frozen model's greedy reply to each fit prompt, an estimate of the KL between the two models'
reply distributions. RLHF's KL penalty plays the same role, but it samples the trained policy;
sampling the frozen model instead costs no generation per step.

A prompt's reply is generated once, in the run's precision, and kept for the rest of the fit:
before training for the prompts the fit's batches will read (:meth:`AnchorReplies.prefetch`, many
prompts per ``generate`` call, whose cost is mostly per decoding step, not per row), else the first
time a batch needs it. Greedy decoding makes a resumed fit regenerate the same replies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import GenerationConfig

from rahf.data.render import Encoded
from rahf.evaluate.generation import continue_batch, cut_at_stop
from rahf.hidden_states import pad_batch


def batch_prompts(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """Each row's prompt token ids (right-padded rows: the prompt fills 0 .. reply_start - 1)."""
    return [row[:start].tolist() for row, start in zip(batch["input_ids"], batch["reply_start"].tolist(), strict=True)]


class AnchorReplies:
    """The frozen model's greedy reply to each prompt, kept once generated.

    A reply holds up to ``max_new_tokens`` tokens and ends with the stop token that ended it, if
    one came: the term then also holds the decision to stop there.
    """

    def __init__(self, *, stop_ids: Sequence[int], pad_id: int, max_new_tokens: int, batch_size: int = 32) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"an anchor reply needs max_new_tokens >= 1, got {max_new_tokens}")
        self.stop_ids, self.pad_id, self.batch_size = list(stop_ids), pad_id, batch_size
        self.config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, eos_token_id=self.stop_ids or None
        )
        self.replies: dict[tuple[int, ...], list[int]] = {}

    @torch.no_grad()
    def prefetch(self, frozen_model: torch.nn.Module, prompts: Sequence[Sequence[int]]) -> int:
        """Generate the replies ``prompts`` still lack, ``batch_size`` prompts per call; returns how many."""
        missing = sorted({tuple(p) for p in prompts} - self.replies.keys(), key=lambda p: (len(p), p))  # similar lengths pad less
        for start in range(0, len(missing), self.batch_size):
            part = missing[start : start + self.batch_size]
            for prompt, new in zip(part, continue_batch(frozen_model, part, self.config, self.pad_id), strict=True):
                kept, stopped = cut_at_stop(new, self.stop_ids)
                self.replies[prompt] = kept + new[len(kept) : len(kept) + 1] if stopped else kept
        return len(missing)

    def batch(self, frozen_model: torch.nn.Module, prompts: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Right-padded rows of prompt + reply, one per distinct prompt, in first-seen order
        (a pair's two examples share their prompt). ``frozen_model`` writes the missing replies."""
        distinct = list(dict.fromkeys(tuple(p) for p in prompts))
        self.prefetch(frozen_model, distinct)
        return pad_batch([Encoded(list(p), self.replies[p], False, False) for p in distinct], self.pad_id)
