"""Format adapters: turn one raw row (a dict) of a known dataset layout into a PreferencePair.

Formats (``FORMATS``), auto-detected from the first row that looks like one of them:

* ``hh`` -- Anthropic HH-RLHF: ``chosen`` / ``rejected`` are whole transcripts of
  ``"\\n\\nHuman: ..."`` / ``"\\n\\nAssistant: ..."`` turns; everything before the final assistant
  turn is the prompt and must be the same in both.
* ``plain`` -- ``prompt``, ``chosen``, ``rejected`` strings (other keys are ignored).
* ``conversational`` -- TRL style: ``chosen`` / ``rejected`` are message lists; ``prompt`` is
  optional (a message list or a string). Without it the shared prefix of the two lists is the
  prompt; with it the final assistant message of each list is the reply.
* ``ultrafeedback`` -- ``prompt`` string with ``chosen`` / ``rejected`` message lists
  (HuggingFaceH4/ultrafeedback_binarized), or the RAHF reference splits' ``chosen_response`` /
  ``rejected_respomse`` (sic; ``rejected_response`` is accepted too) strings.

Message contents and replies are stripped of surrounding whitespace. A prompt must end with a
user message: otherwise the row is invalid with reason ``malformed_transcript`` for ``hh`` and
``bad_role`` for the message-list formats (there the offending role is the problem).

A bad row raises :class:`RowError` with a reason key from ``REASONS``; the reader turns it into
a ``DataError`` (file, row, field) or, with ``skip_invalid``, into a count.

Files whose fields have other names are read through a column mapping (``parse_columns``,
``rename_columns``; ``--columns prompt=question,chosen=good,rejected=bad``): the mapped
columns take the standard names before detection, and errors name the file's columns.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from rahf.data.schema import DataError, Message

PROMPT, CHOSEN, REJECTED = "prompt", "chosen", "rejected"
ROLES = ("system", "user", "assistant")
WHOLE_ROW = "(row)"  # the ``field`` of errors about the row as a whole (bad JSON, not an object)
BOTH = "chosen/rejected"  # the ``field`` of errors comparing the two replies

FormatName = Literal["hh", "plain", "conversational", "ultrafeedback"]
FORMATS: tuple[str, ...] = ("hh", "plain", "conversational", "ultrafeedback")

# reason key -> words for error messages
REASONS: dict[str, str] = {
    "missing_field": "missing field",
    "wrong_type": "wrong type",
    "empty_reply": "empty reply",
    "empty_prompt": "empty prompt",
    "identical_replies": "chosen and rejected replies are identical",
    "bad_json": "not valid JSON",
    "prompt_mismatch": "chosen and rejected have different prompts",
    "malformed_transcript": "malformed transcript",
    "bad_role": "bad role",
    "misplaced_system": "a system message is allowed only as the first message",
    "not_an_object": "row is not a JSON object",
    "too_long": "row too long",
    "bad_csv": "not a valid CSV row",
}

Parsed = tuple[tuple[Message, ...], str, str]  # (prompt, chosen, rejected)


class RowError(Exception):
    """One invalid row: which field, which reason (a ``REASONS`` key), and optional detail."""

    def __init__(self, field: str, reason: str, detail: str = "") -> None:
        assert reason in REASONS, reason
        self.field, self.reason, self.detail = field, reason, detail
        super().__init__(self.words)

    @property
    def words(self) -> str:
        text = REASONS[self.reason]
        return f"{text} ({self.detail})" if self.detail else text


# -- column mapping -------------------------------------------------------------------------

COLUMN_KEYS = (PROMPT, CHOSEN, REJECTED)
COLUMNS_EXAMPLE = "prompt=question,chosen=good,rejected=bad"


def parse_columns(spec: str | Mapping[str, str] | None, *, name: str = "--columns") -> dict[str, str]:
    """``"prompt=question,chosen=good"`` (or a mapping) -> ``{"prompt": "question", ...}``.

    Keys are ``COLUMN_KEYS``; values are the file's column names. Raises ``DataError`` (one
    line, with an example) on bad syntax, unknown or repeated keys, or one column mapped twice.
    """
    if spec is None or spec == "" or spec == {}:
        return {}
    if isinstance(spec, Mapping):
        items = [(str(k).strip(), v) for k, v in spec.items()]
    elif isinstance(spec, str):
        items = []
        for part in spec.split(","):
            key, sep, column = part.partition("=")
            if not sep or not key.strip():
                raise DataError(f"{name}: '{part.strip()}' is not key=column; write e.g. {COLUMNS_EXAMPLE}")
            items.append((key.strip(), column))
    else:
        raise DataError(f"{name}: expected key=column pairs such as {COLUMNS_EXAMPLE}, got {spec!r}")
    mapping: dict[str, str] = {}
    for key, column in items:
        if key not in COLUMN_KEYS:
            raise DataError(f"{name}: unknown key '{key}'; the keys are {', '.join(COLUMN_KEYS)} (e.g. {COLUMNS_EXAMPLE})")
        if key in mapping:
            raise DataError(f"{name}: '{key}' is mapped twice")
        if not isinstance(column, str):
            raise DataError(f"{name}: the column for {key} must be a name, got {column!r}")
        if not column.strip():
            raise DataError(f"{name}: no column name after '{key}=' (e.g. {COLUMNS_EXAMPLE})")
        mapping[key] = column.strip()
    for key, column in mapping.items():
        others = [k for k, c in mapping.items() if c == column and k != key]
        if others:
            raise DataError(f"{name}: column '{column}' is mapped to both {key} and {others[0]}")
    return mapping


def rename_columns(row: Any, mapping: Mapping[str, str]) -> Any:
    """The row with its mapped columns under the standard names (``prompt``/``chosen``/...).

    A standard-named column that a mapped one replaces is dropped. A mapped column missing from
    this row raises ``RowError`` naming it (the reader checks the first row up front).
    """
    if not mapping or not isinstance(row, Mapping):
        return row
    renamed = {k: v for k, v in row.items() if k not in mapping}
    for key, column in mapping.items():
        if column not in row:
            raise RowError(column, "missing_field", f"the column mapped to {key}")
        renamed[key] = row[column]
    return renamed


def detect_format(row: Any) -> str | None:
    """The format a row looks like, from its keys and value types; None if it looks like none."""
    if not isinstance(row, Mapping):
        return None
    if "chosen_response" in row:
        return "ultrafeedback"
    chosen = row.get(CHOSEN)
    if isinstance(chosen, list):
        return "ultrafeedback" if isinstance(row.get(PROMPT), str) else "conversational"
    if isinstance(chosen, str) and isinstance(row.get(REJECTED), str):
        return "plain" if PROMPT in row else "hh"
    return None


def parse_row(row: Any, format: str) -> Parsed:
    """Apply the adapter of ``format`` to one row; raises RowError if the row is invalid."""
    if not isinstance(row, Mapping):
        raise RowError(WHOLE_ROW, "not_an_object", f"got {_type_name(row)}")
    return ADAPTERS[format](row)


# -- shared checks --------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _get(row: Mapping, field: str, kind: type | tuple[type, ...]) -> Any:
    if field not in row or row[field] is None:
        raise RowError(field, "missing_field")
    value = row[field]
    if not isinstance(value, kind):
        want = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        want = want.replace("str", "string")
        raise RowError(field, "wrong_type", f"expected {want}, got {_type_name(value)}")
    return value


def _finish(
    prompt: Sequence[Message],
    chosen: str,
    rejected: str,
    *,
    last_role_reason: str,
    fields: tuple[str, str] = (CHOSEN, REJECTED),
) -> Parsed:
    """Checks common to every format, in the order the reasons are reported."""
    if not prompt:
        raise RowError(PROMPT, "empty_prompt")
    if prompt[-1]["role"] != "user":
        raise RowError(
            PROMPT, last_role_reason, f"the prompt must end with a user message, not {prompt[-1]['role']}"
        )
    if not prompt[-1]["content"]:
        raise RowError(PROMPT, "empty_prompt")
    if not chosen:
        raise RowError(fields[0], "empty_reply")
    if not rejected:
        raise RowError(fields[1], "empty_reply")
    if chosen == rejected:
        raise RowError(BOTH, "identical_replies")
    return tuple(prompt), chosen, rejected


def _messages(value: Any, field: str) -> list[Message]:
    """Validate a message list: dicts with string role/content, known roles, system only first."""
    if not isinstance(value, list):
        raise RowError(field, "wrong_type", f"expected a list of messages, got {_type_name(value)}")
    out: list[Message] = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise RowError(field, "wrong_type", f"message {i} is {_type_name(message)}, not an object")
        for key in ("role", "content"):
            if message.get(key) is None:
                raise RowError(field, "missing_field", f"message {i} has no '{key}'")
            if not isinstance(message[key], str):
                raise RowError(
                    field, "wrong_type", f"message {i} '{key}' is {_type_name(message[key])}, not a string"
                )
        role = message["role"]
        if role not in ROLES:
            raise RowError(field, "bad_role", f"message {i} has role '{role}'")
        if role == "system" and i > 0:
            raise RowError(field, "misplaced_system", f"message {i}")
        out.append({"role": role, "content": message["content"].strip()})
    return out


def _final_reply(messages: list[Message], field: str) -> str:
    if not messages:
        raise RowError(field, "empty_reply", "no messages")
    if messages[-1]["role"] != "assistant":
        raise RowError(
            field, "bad_role", f"the reply must be an assistant message, not {messages[-1]['role']}"
        )
    return messages[-1]["content"]


# -- adapters -------------------------------------------------------------------------------


def _plain(row: Mapping) -> Parsed:
    prompt = _get(row, PROMPT, str).strip()
    chosen = _get(row, CHOSEN, str).strip()
    rejected = _get(row, REJECTED, str).strip()
    if not prompt:
        raise RowError(PROMPT, "empty_prompt")
    return _finish([{"role": "user", "content": prompt}], chosen, rejected, last_role_reason="bad_role")


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}


def _hh_turns(text: str, field: str) -> list[Message]:
    """Split an HH transcript into messages; the last one must be the assistant's reply."""
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n"))
    # parts = [preamble, role, content, role, content, ...]
    if parts[0].strip():
        raise RowError(field, "malformed_transcript", "text before the first 'Human:' turn")
    turns = [
        {"role": _HH_ROLE[role], "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2], strict=True)
    ]
    if not any(t["role"] == "user" for t in turns):
        raise RowError(field, "malformed_transcript", "no 'Human:' turn")
    if turns[-1]["role"] != "assistant":
        raise RowError(field, "malformed_transcript", "the last turn is not an 'Assistant:' turn")
    return turns


def _hh(row: Mapping) -> Parsed:
    chosen_text, rejected_text = _get(row, CHOSEN, str), _get(row, REJECTED, str)
    chosen, rejected = _hh_turns(chosen_text, CHOSEN), _hh_turns(rejected_text, REJECTED)
    if chosen[:-1] != rejected[:-1]:
        raise RowError(BOTH, "prompt_mismatch", "the turns before the final reply differ")
    return _finish(
        chosen[:-1], chosen[-1]["content"], rejected[-1]["content"], last_role_reason="malformed_transcript"
    )


def _prompt_messages(value: Any) -> list[Message]:
    if isinstance(value, str):
        return [{"role": "user", "content": value.strip()}] if value.strip() else []
    return _messages(value, PROMPT)


def _conversational(row: Mapping) -> Parsed:
    chosen = _messages(_get(row, CHOSEN, list), CHOSEN)
    rejected = _messages(_get(row, REJECTED, list), REJECTED)
    if row.get(PROMPT) is not None:
        prompt = _prompt_messages(_get(row, PROMPT, (str, list)))
        return _finish(
            prompt, _final_reply(chosen, CHOSEN), _final_reply(rejected, REJECTED), last_role_reason="bad_role"
        )
    chosen_reply, rejected_reply = _final_reply(chosen, CHOSEN), _final_reply(rejected, REJECTED)
    if chosen[:-1] != rejected[:-1]:
        raise RowError(BOTH, "prompt_mismatch", "the messages before the final reply differ")
    return _finish(chosen[:-1], chosen_reply, rejected_reply, last_role_reason="bad_role")


def _ultrafeedback(row: Mapping) -> Parsed:
    prompt = _prompt_messages(_get(row, PROMPT, str))
    if "chosen_response" in row:
        fields = ("chosen_response", "rejected_respomse")  # sic: the reference splits' spelling
        if fields[1] not in row and "rejected_response" in row:
            fields = ("chosen_response", "rejected_response")
        chosen = _get(row, fields[0], str).strip()
        rejected = _get(row, fields[1], str).strip()
        return _finish(prompt, chosen, rejected, last_role_reason="bad_role", fields=fields)
    chosen = _final_reply(_messages(_get(row, CHOSEN, list), CHOSEN), CHOSEN)
    rejected = _final_reply(_messages(_get(row, REJECTED, list), REJECTED), REJECTED)
    return _finish(prompt, chosen, rejected, last_role_reason="bad_role")


ADAPTERS: dict[str, Callable[[Mapping], Parsed]] = {
    "hh": _hh,
    "plain": _plain,
    "conversational": _conversational,
    "ultrafeedback": _ultrafeedback,
}
