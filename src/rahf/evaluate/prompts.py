"""Prompt sets for generation: plain prompts, conversations, and MT-Bench questions.

One JSON object per line (``.jsonl`` or ``.jsonl.gz``; a ``.json`` file may hold a list):

* ``{"prompt": "text"}`` -- one user turn;
* ``{"messages": [{"role": ..., "content": ...}, ...]}`` or ``{"prompt": [messages]}`` -- a
  conversation; trailing assistant messages (reference answers) are dropped, so the model
  answers the last user message;
* ``{"question_id": 81, "turns": ["q1", "q2"]}`` -- MT-Bench: answered turn by turn, turn 2
  seeing the model's own turn-1 answer.

Optional keys: ``id`` (else ``question_id``, else the line number), ``category``, and
``harmful`` (true for harmful requests: refusal rate is measured on those, over-refusal on the
rest). A whole file can be marked harmful by the caller (``rahf eval --harmful-prompts``).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rahf.data.formats import ROLES
from rahf.data.schema import DataError, Message


@dataclass(frozen=True)
class PromptItem:
    """The conversation answered first, then ``follow_ups`` answered one after another."""

    id: str
    messages: tuple[Message, ...]  # ends with a user message
    follow_ups: tuple[str, ...] = ()
    category: str = ""
    harmful: bool = False
    origin: str = ""

    @property
    def n_turns(self) -> int:
        return 1 + len(self.follow_ups)


@dataclass
class PromptSet:
    items: list[PromptItem] = field(default_factory=list)
    source: str = ""
    format: str = ""  # "prompt", "messages" or "mt-bench" (of the first row)


def _user(text: Any, where: str) -> Message:
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: expected a non-empty string, got {text!r:.60}")
    return {"role": "user", "content": text.strip()}


def _messages(value: Any, where: str) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: expected a non-empty list of messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: message {i} needs a role in {ROLES} and a string content")
        out.append({"role": message["role"], "content": message["content"].strip()})
    while out and out[-1]["role"] == "assistant":
        out.pop()
    if not out or out[-1]["role"] != "user":
        raise DataError(f"{where}: the conversation must contain a user message to answer")
    return tuple(out)


def parse_prompt_row(row: Any, where: str) -> tuple[PromptItem, str]:
    """One row as a :class:`PromptItem` and the name of its layout."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object")
    harmful = row.get("harmful", False)
    if not isinstance(harmful, bool):
        raise DataError(f"{where}: 'harmful' must be true or false")
    if "turns" in row:
        turns = row["turns"]
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: 'turns' must be a non-empty list of strings")
        users = [_user(t, f"{where} turns[{i}]") for i, t in enumerate(turns)]
        messages, follow_ups, layout = (users[0],), tuple(u["content"] for u in users[1:]), "mt-bench"
    elif "messages" in row:
        messages, follow_ups, layout = _messages(row["messages"], f"{where} messages"), (), "messages"
    elif "prompt" in row:
        value = row["prompt"]
        if isinstance(value, list):
            messages, layout = _messages(value, f"{where} prompt"), "messages"
        else:
            messages, layout = (_user(value, f"{where} prompt"),), "prompt"
        follow_ups = ()
    else:
        raise DataError(f"{where}: expected a 'prompt', 'messages' or 'turns' field")
    item_id = row.get("id", row.get("question_id", where.rsplit(":", 1)[-1]))
    item = PromptItem(
        id=str(item_id),
        messages=messages,
        follow_ups=follow_ups,
        category=str(row.get("category", "")),
        harmful=harmful,
        origin=where,
    )
    return item, layout


def _rows(path: Path) -> list[tuple[int, Any]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        text = handle.read()
    if path.name.endswith((".json", ".json.gz")):
        data = json.loads(text)
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json prompt file must hold a list of objects")
        return list(enumerate(data, start=1))
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    return rows


def load_prompts(path: str | Path, *, harmful: bool | None = None, limit: int | None = None) -> PromptSet:
    """Read a prompt file; ``harmful`` (if given) overrides the per-row flag for every item."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such prompt file")
    result = PromptSet(source=str(path))
    for number, row in _rows(path):
        item, layout = parse_prompt_row(row, f"{path}:{number}")
        if harmful is not None:
            item = replace(item, harmful=harmful)
        result.format = result.format or layout
        result.items.append(item)
        if limit is not None and len(result.items) >= limit:
            break
    if not result.items:
        raise DataError(f"{path}: no prompts")
    return result
