"""Preference data: load and check (prompt, chosen, rejected) pairs, split them, tokenise them.

    from rahf.data import load_preferences, split_pairs
    result = load_preferences("builtin")            # or a .jsonl/.parquet file, folder, hub id
    train, validation = split_pairs(result.pairs, validation_fraction=0.1)
"""

from rahf.data.formats import FORMATS
from rahf.data.readers import load_preferences
from rahf.data.render import (
    Encoded,
    TruncationStats,
    encode,
    encode_prompt,
    encode_reply,
    render_prompt,
)
from rahf.data.schema import DataError, LoadResult, PreferencePair
from rahf.data.split import split_pairs

__all__ = [
    "FORMATS",
    "DataError",
    "Encoded",
    "LoadResult",
    "PreferencePair",
    "TruncationStats",
    "encode",
    "encode_prompt",
    "encode_reply",
    "load_preferences",
    "render_prompt",
    "split_pairs",
]
