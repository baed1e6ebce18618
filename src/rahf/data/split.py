"""Train / validation split by prompt, stable across runs, machines and Python versions.

A pair goes to validation iff ``sha256(f"{seed}\\0{prompt_text}")``, read as a number in [0, 1),
is below ``validation_fraction``. Hashing the prompt (not the row index) keeps every pair of a
prompt on one side, so validation never sees a training prompt, and adding or reordering rows
never moves an existing pair. Python's ``hash()`` is salted per process, hence hashlib.

:func:`disjoint_halves` cuts the training pairs the same way into the step-1 half and the
patterns half (steps 2-3), with a different salt, so the two cuts are independent.
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


PATTERNS_SALT = "patterns"  # keeps the halves' cut independent of the validation cut


def disjoint_halves(
    pairs: Iterable[PreferencePair], *, share: float, seed: int = 0
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """``(step1, patterns)``: prompt-disjoint, each in input order; a pair goes to the patterns
    half iff ``sha256(f"{seed}\\0patterns\\0{prompt_text}")`` in [0, 1) is below ``share``.

    Patterns read on replies step 1 trained on partly encode memorisation (docs/method.md, "Which
    pairs feed which step"); the reference splits UltraFeedback by prompt the same way.
    ``share`` 0 returns every pair in both lists: today's behaviour.
    """
    if not 0.0 <= share < 1.0:
        raise DataError(f"patterns.disjoint_share must be in [0, 1), got {share}")
    pairs = list(pairs)
    if share == 0:
        return pairs, list(pairs)
    step1: list[PreferencePair] = []
    patterns: list[PreferencePair] = []
    for pair in pairs:
        held = _unit_interval(seed, f"{PATTERNS_SALT}\0{pair.prompt_text()}") < share
        (patterns if held else step1).append(pair)
    return step1, patterns


def split_counts(
    pairs: Iterable[PreferencePair], *, validation_fraction: float = 0.1, share: float = 0.5, seed: int = 0
) -> dict:
    """Pairs and prompts per part, as ``rahf align`` would cut them (before ``max_pairs``)."""
    train, validation = split_pairs(pairs, validation_fraction=validation_fraction, seed=seed)
    step1, patterns = disjoint_halves(train, share=share, seed=seed)

    def prompts(part: list[PreferencePair]) -> int:
        return len({p.prompt_text() for p in part})

    parts = {"train": train, "validation": validation, "step1": step1, "patterns": patterns}
    return {
        "validation_fraction": validation_fraction, "disjoint_share": share, "seed": seed,
        "pairs": {name: len(part) for name, part in parts.items()},
        "prompts": {name: prompts(part) for name, part in parts.items()},
    }
