"""One representation of a preference pair, shared by every reader, stage and baseline.

Data uses TRL's vocabulary: ``prompt`` / ``chosen`` / ``rejected``. A prompt is a list of chat
messages (``{"role": ..., "content": ...}``) ending with a user turn; multi-turn prompts keep the
earlier user/assistant turns. ``chosen`` and ``rejected`` are the two candidate final assistant
replies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Message = dict[str, str]


@dataclass(frozen=True)
class PreferencePair:
    prompt: tuple[Message, ...]
    chosen: str
    rejected: str
    origin: str = ""  # "file:row" where the pair came from, for error messages and reports

    def prompt_text(self) -> str:
        """The prompt as plain text (used for hashing into the train/validation split)."""
        return "\n".join(f"{m['role']}: {m['content']}" for m in self.prompt)


class DataError(ValueError):
    """Bad user data. The message names the file, the row and the field."""


@dataclass
class LoadResult:
    pairs: list[PreferencePair]
    format: str
    invalid: dict[str, int] = field(default_factory=dict)  # reason -> count
    invalid_rows: list[tuple[int, str, str]] = field(default_factory=list)  # (row, field, reason)
    source: str = ""
