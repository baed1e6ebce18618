"""Held-out preference accuracy of any causal LM on any preference pairs.

For a pair (x, y+, y-) with summed reply log-likelihood ``s(y) = sum_t log p(y_t | x, y_<t)``
over ``|y|`` reply tokens (EOS included, see ``rahf.data.render``):

* mean-token accuracy: share of pairs with ``s(y+)/|y+| > s(y-)/|y-|`` (length-neutral);
* summed accuracy: share with ``s(y+) > s(y-)`` (favours short replies);
* with a reference model, DPO's implicit reward ``r(y) = s_model(y) - s_ref(y)``:
  implicit-reward accuracy is the share with ``r(y+) > r(y-)`` and the margin is the mean of
  ``r(y+) - r(y-) = (s_model(y+) - s_ref(y+)) - (s_model(y-) - s_ref(y-))`` (summed log-probs, no
  beta). The reference is scored with its own tokenizer.

Ties (equal scores) count as wrong. Every number has a seeded bootstrap 95% interval over pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rahf.data.schema import PreferencePair
from rahf.evaluate.scoring import PairScores, score_pairs
from rahf.evaluate.stats import DEFAULT_RESAMPLES, Estimate, bootstrap


@dataclass
class PreferenceResult:
    """Accuracies of one model on one set of pairs (implicit-reward fields need a reference)."""

    n: int
    accuracy: Estimate  # mean token log-likelihood
    accuracy_summed: Estimate
    implicit_accuracy: Estimate | None = None
    margin: Estimate | None = None
    # per pair, l(y+) - l(y-) of mean-token log-likelihoods (nats): moves before accuracy does,
    # and compares two models pair by pair (``margin_vs_baseline`` in ``rahf eval``)
    pair_margins: np.ndarray | None = None
    mean_token_margin: Estimate | None = None

    def to_dict(self) -> dict:
        out: dict = {"n": self.n}
        for name in ("accuracy", "accuracy_summed", "implicit_accuracy", "margin", "mean_token_margin"):
            value = getattr(self, name)
            out[name] = value.to_dict() if value is not None else None
        out["pair_margins"] = None if self.pair_margins is None else [round(float(m), 6) for m in self.pair_margins]
        return out


def implicit_rewards(policy: PairScores, reference: PairScores) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r(y+), r(y-))`` with ``r(y) = s_model(y) - s_ref(y)`` (summed log-probs)."""
    return policy.chosen_sum - reference.chosen_sum, policy.rejected_sum - reference.rejected_sum


def accuracy_from_scores(
    scores: PairScores,
    reference: PairScores | None = None,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> PreferenceResult:
    """Turn per-pair log-likelihoods into accuracies, the margin and their intervals."""
    mean_wins = (scores.chosen_mean > scores.rejected_mean).float().numpy()
    sum_wins = (scores.chosen_sum > scores.rejected_sum).float().numpy()
    pair_margins = (scores.chosen_mean - scores.rejected_mean).double().numpy()
    result = PreferenceResult(
        n=len(mean_wins),
        accuracy=bootstrap(mean_wins, resamples=resamples, seed=seed),
        accuracy_summed=bootstrap(sum_wins, resamples=resamples, seed=seed),
        pair_margins=pair_margins,
        mean_token_margin=bootstrap(pair_margins, resamples=resamples, seed=seed),
    )
    if reference is not None:
        chosen, rejected = implicit_rewards(scores, reference)
        margins = (chosen - rejected).double().numpy()
        result.implicit_accuracy = bootstrap(
            (margins > 0).astype(np.float64), resamples=resamples, seed=seed
        )
        result.margin = bootstrap(margins, resamples=resamples, seed=seed)
    return result


def preference_accuracy(
    model: torch.nn.Module,
    tokenizer,
    pairs: Sequence[PreferencePair],
    *,
    reference: torch.nn.Module | None = None,
    reference_tokenizer=None,
    reference_scores: PairScores | None = None,
    instruction: str | None = None,
    batch_size: int = 8,
    max_prompt_tokens: int = 256,
    max_reply_tokens: int = 256,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    progress: bool = True,
    desc: str = "preference accuracy",
) -> PreferenceResult:
    """Score every pair under ``model`` (and ``reference``) and report the accuracies.

    Pass ``reference_scores`` (from ``rahf.evaluate.scoring.score_pairs``) instead of ``reference`` to
    score the reference once for several models. Replies longer than ``max_reply_tokens`` are
    scored on their first tokens only. ``instruction`` is a system prompt for ``model`` only
    (the reference is scored without it).
    """
    if not pairs:
        raise ValueError("no pairs to score")
    windows = {"max_prompt_tokens": max_prompt_tokens, "max_reply_tokens": max_reply_tokens}
    scores = score_pairs(
        model, tokenizer, pairs, instruction=instruction, batch_size=batch_size, progress=progress, desc=desc,
        **windows,
    )
    ref_scores = reference_scores
    if reference is not None and ref_scores is None:
        ref_scores = score_pairs(
            reference, reference_tokenizer or tokenizer, pairs,
            batch_size=batch_size, progress=progress, desc=f"{desc} (reference)", **windows,
        )
    return accuracy_from_scores(scores, ref_scores, resamples=resamples, seed=seed)
