"""Bootstrap intervals, win rates with ties, and the length-controlled win rate."""

import numpy as np
import pytest

from rahf.evaluate.stats import (
    Estimate,
    bootstrap,
    length_controlled_win_rate,
    length_feature,
    win_outcomes,
    win_rate,
)


def test_bootstrap_interval_contains_estimate_and_is_seeded():
    values = np.random.default_rng(1).random(200)
    first = bootstrap(values, seed=3)
    assert first.value == pytest.approx(values.mean())
    assert first.low < first.value < first.high
    assert bootstrap(values, seed=3) == first
    assert bootstrap(values, seed=4) != first
    assert first.n == 200


def test_bootstrap_single_item_has_no_interval():
    assert bootstrap([0.7]) == Estimate(0.7, None, None, 1)
    with pytest.raises(ValueError):
        bootstrap([])


def test_win_rate_counts_ties_as_half():
    a = [3.0, 1.0, 2.0, 5.0]
    b = [1.0, 2.0, 2.0, 5.0 + 1e-9]  # win, loss, tie, tie within tolerance
    assert win_outcomes(a, b).tolist() == [1.0, 0.0, 0.5, 0.5]
    assert win_rate(a, b, resamples=100).value == pytest.approx(0.5)
    assert win_rate([1, 1, 1], [0, 0, 1], resamples=0).value == pytest.approx(2.5 / 3)


def test_length_controlled_win_rate_removes_a_pure_length_effect():
    rng = np.random.default_rng(0)
    n = 2000
    length_b = rng.integers(50, 150, n)
    length_a = length_b + rng.normal(60, 50, n).astype(int)  # A is usually longer
    d = length_feature(length_a, length_b)
    outcomes = (rng.random(n) < 1 / (1 + np.exp(-3 * d))).astype(float)  # depends only on length
    raw = outcomes.mean()
    lc = length_controlled_win_rate(outcomes, length_a, length_b, resamples=50)
    assert raw > 0.75  # the raw win rate rewards length
    assert lc.value == pytest.approx(0.5, abs=0.06)  # sampling noise: 0.47-0.54 over seeds
    assert lc.low < 0.5 < lc.high


def test_length_controlled_equals_raw_without_length_differences():
    outcomes = np.array([1, 1, 1, 0, 0.5, 1, 0, 1], dtype=float)
    lengths = np.full(len(outcomes), 100)
    lc = length_controlled_win_rate(outcomes, lengths, lengths, resamples=0)
    assert lc.value == pytest.approx(outcomes.mean(), abs=1e-3)
