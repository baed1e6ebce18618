"""Train / validation split by prompt, stable across runs, machines and Python versions.

A pair goes to validation iff ``sha256(f"{seed}\\0{prompt_text}")``, read as a number in [0, 1),
is below ``validation_fraction``. Hashing the prompt (not the row index) keeps every pair of a
prompt on one side, so validation never sees a training prompt, and adding or reordering rows
never moves an existing pair. Python's ``hash()`` is salted per process, hence hashlib.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from rahf.data.schema import DataError, PreferencePair


def _unit_interval(seed: int, text: str) -> float:
    digest = hashlib.sha256(f"{seed}\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_pairs(
    pairs: Iterable[PreferencePair], *, validation_fraction: float = 0.1, seed: int = 0
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """``(train, validation)``, each in input order; the expected validation share is the fraction."""
    if not 0.0 <= validation_fraction < 1.0:
        raise DataError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    train: list[PreferencePair] = []
    validation: list[PreferencePair] = []
    for pair in pairs:
        held_out = validation_fraction > 0 and _unit_interval(seed, pair.prompt_text()) < validation_fraction
        (validation if held_out else train).append(pair)
    return train, validation
