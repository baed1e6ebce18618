"""Point estimates with seeded bootstrap intervals, win rates, and the length-controlled win rate.

Every number in a report is an :class:`Estimate`: the value on the full sample plus a 95%
percentile-bootstrap interval (resample items with replacement, recompute the statistic, take the
2.5% and 97.5% quantiles). The generator is seeded, so the same data gives the same interval.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_RESAMPLES = 1000


@dataclass(frozen=True)
class Estimate:
    """A statistic with its bootstrap interval over ``n`` items (low/high are None if n < 2)."""

    value: float
    low: float | None
    high: float | None
    n: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Estimate:
        return cls(**data)

    def __str__(self) -> str:
        if self.low is None or self.high is None:
            return f"{self.value:.3f}"
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def bootstrap(
    values: Sequence[float] | np.ndarray,
    *,
    statistic: Callable[[np.ndarray], np.ndarray] | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """Mean (or ``statistic``) of ``values`` with a seeded percentile-bootstrap interval.

    Items are along the first axis of ``values``. ``statistic`` maps a (resamples, n, ...) array
    to (resamples,) -- vectorised, so 1000 resamples of thousands of items take milliseconds.
    Default: the mean over axis 1.
    """
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        raise ValueError("cannot estimate a statistic of zero items")
    stat = statistic or (lambda a: a.mean(axis=1))
    value = float(stat(x[None, :])[0])
    if n < 2 or resamples < 1:
        return Estimate(value, None, None, n)
    rng = np.random.default_rng(seed)
    draws = stat(x[rng.integers(0, n, size=(resamples, n))])
    tail = (1 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return Estimate(value, float(low), float(high), n)


def win_outcomes(
    scores_a: Sequence[float] | np.ndarray,
    scores_b: Sequence[float] | np.ndarray,
    *,
    tie_tolerance: float = 1e-6,
) -> np.ndarray:
    """Per prompt: 1 if A scores higher, 0 if lower, 0.5 for a tie (|a - b| <= tie_tolerance).

    The tolerance absorbs padding-dependent float noise, so identical replies always tie.
    """
    a = np.asarray(scores_a, dtype=float)
    b = np.asarray(scores_b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"score arrays differ in shape: {a.shape} vs {b.shape}")
    diff = a - b
    return np.where(np.abs(diff) <= tie_tolerance, 0.5, (diff > 0).astype(float))


def win_rate(
    scores_a: Sequence[float] | np.ndarray,
    scores_b: Sequence[float] | np.ndarray,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    tie_tolerance: float = 1e-6,
) -> Estimate:
    """Share of prompts where A beats B, ties counting one half, with a bootstrap interval."""
    outcomes = win_outcomes(scores_a, scores_b, tie_tolerance=tie_tolerance)
    return bootstrap(outcomes, resamples=resamples, seed=seed)


def length_feature(length_a: np.ndarray, length_b: np.ndarray) -> np.ndarray:
    """d = tanh((len_a - len_b) / sd), sd = std of the differences (1 if they are all equal).

    tanh bounds the influence of a few huge differences (AlpacaEval 2 does the same).
    """
    diff = np.asarray(length_a, dtype=float) - np.asarray(length_b, dtype=float)
    sd = float(diff.std())
    return np.tanh(diff / (sd if sd > 0 else 1.0))


def _fit_logistic(d: np.ndarray, y: np.ndarray, *, l2: float = 1e-4, steps: int = 50) -> np.ndarray:
    """Newton's method for P(A wins) = sigmoid(theta0 + theta1 * d) with soft targets y in [0, 1].

    Soft targets take ties (0.5) as they are. A tiny L2 penalty keeps theta finite when the data
    are separable.
    """
    x = np.stack([np.ones_like(d), d], axis=1)  # (n, 2)
    theta = np.zeros(2)
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(x @ theta)))
        grad = x.T @ (p - y) / len(y) + l2 * theta
        hess = (x * (p * (1 - p))[:, None]).T @ x / len(y) + l2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    return theta


def length_controlled_win_rate(
    outcomes: Sequence[float] | np.ndarray,
    length_a: Sequence[float] | np.ndarray,
    length_b: Sequence[float] | np.ndarray,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Estimate:
    """Win rate at equal length, AlpacaEval-style.

    Fit the pairwise outcome (1 / 0.5 / 0) by logistic regression on the normalised length
    difference d (:func:`length_feature`): ``P(A wins) = sigmoid(theta0 + theta1 * d)``; report
    ``sigmoid(theta0)``, the predicted win rate when both replies have the same length. If A wins
    only by being longer, theta1 absorbs it and the LC win rate is near 0.5. The interval
    bootstraps prompts and refits (d is normalised once, on the full sample).
    """
    y = np.asarray(outcomes, dtype=float)
    d = length_feature(np.asarray(length_a), np.asarray(length_b))
    if len(y) != len(d):
        raise ValueError("outcomes and lengths differ in size")
    both = np.stack([d, y], axis=1)  # (n, 2): feature, outcome

    def lc(batch: np.ndarray) -> np.ndarray:  # (resamples, n, 2) -> (resamples,)
        thetas = np.array([_fit_logistic(sample[:, 0], sample[:, 1]) for sample in batch])
        return 1 / (1 + np.exp(-thetas[:, 0]))

    return bootstrap(both, statistic=lc, resamples=resamples, seed=seed)
