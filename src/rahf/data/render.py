"""Prompt rendering and tokenisation shared by every training and evaluation stage.

Layout of one encoded example (``Encoded.input_ids``)::

    [bos?] rendered prompt (ends with the generation prompt) | reply tokens [eos]
    ^ prompt_ids                                             ^ reply_ids
    reply token t sits at position len(prompt_ids) + t

* Prompt text: with a chat template, ``apply_chat_template(messages, tokenize=False,
  add_generation_prompt=True)``. The optional ``instruction`` (RAHF's preference instruction)
  is a system message; if the prompt already has one, the instruction goes first, joined by
  ``"\\n\\n"``. A template that rejects the system role (raises) gets the system text prepended
  to the first user message instead. Without a chat template the plain layout is
  ``[instruction\\n\\n][system\\n\\n]Human: ...\\n\\nAssistant: ...\\n\\n...Human: ...\\n\\nAssistant:``.
* Prompt ids: ``tokenizer(text, add_special_tokens=False)``, with ``bos_token_id`` in front when
  the tokenizer has a BOS token and the rendered text does not already start with it.
* Reply ids: the reply is tokenised ON ITS OWN (``" " + reply`` for the plain layout), never
  together with the prompt, so the same reply has the same ids under every instruction -- the
  preferred/dispreferred activity patterns compare exactly the same reply tokens. Then
  ``eos_token_id`` is appended so the model learns to stop.

Truncation (``prompt_truncated`` / ``reply_truncated`` record it):

* Reply: ``max_reply_tokens`` includes the EOS. A longer reply keeps its first
  ``max_reply_tokens`` tokens and has no EOS (the reply did not end there).
* Prompt: keeps the newest turns. First the earliest turns before the final user message are
  dropped, a (user, assistant) exchange at a time; if only the final user message is left and
  the prompt is still too long, the oldest tokens of that message's content are cut. The
  instruction, a leading system message and the template's generation prompt are never cut, so
  ``len(prompt_ids) <= max_prompt_tokens`` holds, or ``DataError`` says the window cannot even
  hold them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from jinja2.exceptions import TemplateError

from rahf.data.schema import DataError, Message

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase as Tokenizer

SEPARATOR = "\n\n"  # between the instruction and a system message or user text, and plain turns
_PLAIN_ROLE = {"user": "Human", "assistant": "Assistant"}


@dataclass
class Encoded:
    prompt_ids: list[int]
    reply_ids: list[int]
    prompt_truncated: bool
    reply_truncated: bool

    @property
    def input_ids(self) -> list[int]:
        """prompt_ids + reply_ids: reply token t sits at position len(prompt_ids) + t."""
        return self.prompt_ids + self.reply_ids


@dataclass
class TruncationStats:
    """How often the token windows cut something; report it so windows can be sized."""

    prompts: int = 0
    prompts_truncated: int = 0
    replies: int = 0
    replies_truncated: int = 0

    def add(self, encoded: Encoded, *, count_prompt: bool = True) -> None:
        """Count one example; pass ``count_prompt=False`` for the second reply of a pair."""
        if count_prompt:
            self.prompts += 1
            self.prompts_truncated += encoded.prompt_truncated
        self.replies += 1
        self.replies_truncated += encoded.reply_truncated

    def summary(self) -> str:
        """One line for logs."""
        return (
            f"prompts truncated {self.prompts_truncated}/{self.prompts},"
            f" replies truncated {self.replies_truncated}/{self.replies}"
        )


def has_chat_template(tokenizer: Tokenizer) -> bool:
    """Whether prompts use the model's chat template or the plain Human/Assistant fallback."""
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: Tokenizer, prompt: Sequence[Message], *, instruction: str | None = None) -> str:
    """The prompt as text, ending where the reply starts (see the module docstring for the layout)."""
    messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    if not has_chat_template(tokenizer):
        return render_plain(messages, instruction=instruction)
    if instruction:  # None or "" adds nothing
        if messages and messages[0]["role"] == "system":
            messages[0]["content"] = instruction + SEPARATOR + messages[0]["content"]
        else:
            messages.insert(0, {"role": "system", "content": instruction})
    try:
        return _apply_template(tokenizer, messages)
    except TemplateError:
        if not messages or messages[0]["role"] != "system":
            raise
    # The template rejects a system role: the system text leads the first user message instead.
    system = messages.pop(0)["content"]
    first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[first_user]["content"] = system + SEPARATOR + messages[first_user]["content"]
    return _apply_template(tokenizer, messages)


def _apply_template(tokenizer: Tokenizer, messages: list[Message]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_plain(messages: Sequence[Message], *, instruction: str | None = None) -> str:
    """The plain layout for tokenizers without a chat template, ending with ``"Assistant:"``.

    The only writer of ``Human:`` / ``Assistant:`` text: prompts here, and reward-model inputs
    (``rahf.evaluate.reward``: this text, ``" " + reply``, EOS).
    """
    parts = [instruction + SEPARATOR] if instruction else []
    for message in messages:
        if message["role"] == "system":
            parts.append(message["content"] + SEPARATOR)
        else:
            parts.append(f"{_PLAIN_ROLE[message['role']]}: {message['content']}{SEPARATOR}")
    parts.append("Assistant:")
    return "".join(parts)


def _prompt_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token", None)
    if bos and tokenizer.bos_token_id is not None and not text.startswith(bos):
        ids = [tokenizer.bos_token_id, *ids]
    return ids


def encode_prompt(
    tokenizer: Tokenizer,
    prompt: Sequence[Message],
    *,
    instruction: str | None = None,
    max_prompt_tokens: int = 256,
    origin: str = "",
) -> tuple[list[int], bool]:
    """``(prompt_ids, truncated)``, newest turns kept; ``origin`` names the pair in errors."""
    if max_prompt_tokens < 1:
        raise DataError(f"max_prompt_tokens must be positive, got {max_prompt_tokens}")

    def ids_of(messages: list[Message]) -> list[int]:
        return _prompt_ids(tokenizer, render_prompt(tokenizer, messages, instruction=instruction))

    messages = list(prompt)
    ids = ids_of(messages)
    if len(ids) <= max_prompt_tokens:
        return ids, False
    # messages = [system?] + history + [final user message]
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    history, last = messages[len(head) : -1], messages[-1]
    while history:
        history = history[1:]
        while history and history[0]["role"] != "user":  # drop whole exchanges
            history = history[1:]
        ids = ids_of(head + history + [last])
        if len(ids) <= max_prompt_tokens:
            return ids, True

    # Only the final user message is left: keep the newest k tokens of its content.
    content_ids = tokenizer(last["content"], add_special_tokens=False)["input_ids"]

    def keep_newest(k: int) -> list[int]:
        # a cut inside a multi-byte character decodes as U+FFFD; drop that partial character
        text = tokenizer.decode(content_ids[len(content_ids) - k :]).lstrip("\ufffd") if k else ""
        return ids_of([*head, {"role": last["role"], "content": text}])

    if len(keep_newest(0)) > max_prompt_tokens:
        raise DataError(
            f"{origin or 'prompt'}: max_prompt_tokens={max_prompt_tokens} cannot hold even the"
            f" instruction, system message and template of this prompt ({len(keep_newest(0))}"
            " tokens with an empty user message); raise max_prompt_tokens or shorten them"
        )
    # Largest k that fits (binary search; only values that were checked to fit are kept).
    low, high = 0, len(content_ids)
    while low < high:
        mid = (low + high + 1) // 2
        if len(keep_newest(mid)) <= max_prompt_tokens:
            low = mid
        else:
            high = mid - 1
    return keep_newest(low), True


def encode_reply(tokenizer: Tokenizer, reply: str, *, max_reply_tokens: int = 64) -> tuple[list[int], bool]:
    """``(reply_ids, truncated)``: the reply alone plus EOS, independent of any prompt."""
    if max_reply_tokens < 1:
        raise DataError(f"max_reply_tokens must be positive, got {max_reply_tokens}")
    text = reply if has_chat_template(tokenizer) else " " + reply
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = [*ids, tokenizer.eos_token_id]
    if len(ids) <= max_reply_tokens:
        return ids, False
    return ids[:max_reply_tokens], True


def encode(
    tokenizer: Tokenizer,
    prompt: Sequence[Message],
    reply: str,
    *,
    instruction: str | None = None,
    max_prompt_tokens: int = 256,
    max_reply_tokens: int = 64,
    origin: str = "",
) -> Encoded:
    """Tokenise one (prompt, reply) example exactly as training and evaluation see it."""
    prompt_ids, prompt_truncated = encode_prompt(
        tokenizer, prompt, instruction=instruction, max_prompt_tokens=max_prompt_tokens, origin=origin
    )
    reply_ids, reply_truncated = encode_reply(tokenizer, reply, max_reply_tokens=max_reply_tokens)
    return Encoded(prompt_ids, reply_ids, prompt_truncated, reply_truncated)
