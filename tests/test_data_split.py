"""The prompt-hash split: deterministic, no prompt on both sides, order kept."""

from __future__ import annotations

import pytest

from rahf.data import DataError, PreferencePair, split_pairs


def pairs(n_prompts: int, per_prompt: int = 3) -> list[PreferencePair]:
    return [
        PreferencePair(({"role": "user", "content": f"prompt {i}"},), f"good {i}.{j}", f"bad {i}.{j}",
                       origin=f"x:{i * per_prompt + j + 1}")
        for j in range(per_prompt)
        for i in range(n_prompts)
    ]


def test_deterministic_and_order_preserving():
    data = pairs(200)
    train, validation = split_pairs(data, validation_fraction=0.2, seed=1)
    assert (train, validation) == split_pairs(list(data), validation_fraction=0.2, seed=1)
    assert sorted(train + validation, key=data.index) == data
    for side in (train, validation):
        positions = [data.index(p) for p in side]
        assert positions == sorted(positions)
    assert 0.1 < len(validation) / len(data) < 0.3


def test_same_prompt_never_on_both_sides():
    train, validation = split_pairs(pairs(100, per_prompt=4), validation_fraction=0.5)
    assert {p.prompt_text() for p in train}.isdisjoint(p.prompt_text() for p in validation)
    assert train and validation


def test_seed_changes_split_and_zero_fraction_keeps_all():
    data = pairs(100, per_prompt=1)
    assert split_pairs(data, seed=0) != split_pairs(data, seed=1)
    assert split_pairs(data, validation_fraction=0.0) == (data, [])


def test_fixed_assignment_is_stable_across_processes():
    """A regression pin: the hash (sha256 of seed and prompt text) must never change."""
    _, validation = split_pairs(pairs(20, per_prompt=1), validation_fraction=0.3, seed=0)
    expected = ["prompt 0", "prompt 1", "prompt 5", "prompt 13", "prompt 16"]
    assert [p.prompt[0]["content"] for p in validation] == expected


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 2.0])
def test_bad_fraction(fraction):
    with pytest.raises(DataError, match="validation_fraction"):
        split_pairs(pairs(2), validation_fraction=fraction)
