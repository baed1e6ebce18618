"""Rendering and tokenisation: exact strings, instruction placement, truncation, invariants."""

from __future__ import annotations

import pytest

from rahf.data import DataError, Encoded, TruncationStats, encode, encode_prompt, render_prompt
from rahf.testing import tiny_tokenizer

NO_SYSTEM_TEMPLATE = (  # like Gemma's: a system message is an error
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "[{{ m['role'] }}] {{ m['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


@pytest.fixture(scope="module")
def chat():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def plain():
    return tiny_tokenizer(chat_template=False)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# -- rendering ------------------------------------------------------------------------------


def test_chat_template_rendering_and_instruction(chat):
    prompt = [user("Hi")]
    assert render_prompt(chat, prompt) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(chat, prompt, instruction="Be kind.") == (
        "<|im_start|>system\nBe kind.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_prompt(chat, [system("Be brief."), *prompt], instruction="Be kind.") == (
        "<|im_start|>system\nBe kind.\n\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_template_without_system_role_gets_instruction_in_first_user_message():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = NO_SYSTEM_TEMPLATE
    prompt = [user("Hi"), assistant("Hello!"), user("Egg?")]
    assert render_prompt(tokenizer, prompt, instruction="Be kind.") == (
        "[user] Be kind.\n\nHi\n[assistant] Hello!\n[user] Egg?\n[assistant] "
    )
    assert render_prompt(tokenizer, [system("Be brief."), *prompt], instruction="Be kind.") == (
        "[user] Be kind.\n\nBe brief.\n\nHi\n[assistant] Hello!\n[user] Egg?\n[assistant] "
    )
    assert render_prompt(tokenizer, prompt) == "[user] Hi\n[assistant] Hello!\n[user] Egg?\n[assistant] "


def test_plain_fallback_rendering(plain):
    prompt = [system("Be brief."), user("Hi"), assistant("Hello!"), user("Egg?")]
    assert render_prompt(plain, prompt, instruction="Be kind.") == (
        "Be kind.\n\nBe brief.\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Egg?\n\nAssistant:"
    )
    assert render_prompt(plain, [user("Egg?")]) == "Human: Egg?\n\nAssistant:"
    encoded = encode(plain, [user("Egg?")], "Nine minutes.")
    assert encoded.prompt_ids == ids(plain, "Human: Egg?\n\nAssistant:")
    assert encoded.reply_ids == ids(plain, " Nine minutes.") + [plain.eos_token_id]


def test_bos_added_only_when_the_text_lacks_it():
    plain = tiny_tokenizer(chat_template=False)
    plain.bos_token = "<|im_start|>"
    prompt_ids, _ = encode_prompt(plain, [user("Egg?")])
    assert prompt_ids == [plain.bos_token_id, *ids(plain, "Human: Egg?\n\nAssistant:")]
    chat = tiny_tokenizer()
    chat.bos_token = "<|im_start|>"  # ChatML text already starts with it
    prompt_ids, _ = encode_prompt(chat, [user("Egg?")])
    assert prompt_ids == ids(chat, render_prompt(chat, [user("Egg?")]))
    assert prompt_ids.count(chat.bos_token_id) == 2  # the user and assistant headers only


def test_layout_reply_position_and_eos(chat):
    encoded = encode(chat, [user("Egg?")], "Nine minutes.", instruction="Be kind.")
    reply = ids(chat, "Nine minutes.")
    assert encoded.reply_ids == reply + [chat.eos_token_id]
    assert encoded.input_ids == encoded.prompt_ids + encoded.reply_ids
    for t, token in enumerate(encoded.reply_ids):
        assert encoded.input_ids[len(encoded.prompt_ids) + t] == token
    assert chat.decode(encoded.input_ids) == (
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nEgg?<|im_end|>\n"
        "<|im_start|>assistant\nNine minutes.<|im_end|>"
    )
    assert not encoded.prompt_truncated and not encoded.reply_truncated


@pytest.mark.parametrize("tokenizer_kind", ["chat", "plain"])
def test_reply_ids_identical_under_any_instruction(request, tokenizer_kind):
    tokenizer = request.getfixturevalue(tokenizer_kind)
    prompt = [system("Be brief."), user("Hi"), assistant("Hello!"), user("How do I boil an egg?")]
    reply = "Put it in boiling water for nine minutes."
    encodings = [
        encode(tokenizer, prompt, reply, instruction=instruction, max_reply_tokens=max_reply)
        for instruction in (None, "You are a helpful, honest and harmless assistant.", "Be rude.")
        for max_reply in (8, 64)
    ]
    assert len({tuple(e.reply_ids) for e in encodings if not e.reply_truncated}) == 1
    assert len({tuple(e.reply_ids) for e in encodings if e.reply_truncated}) == 1
    assert len({tuple(e.prompt_ids) for e in encodings}) == 3


# -- truncation -----------------------------------------------------------------------------


def test_reply_truncation_keeps_first_tokens_without_eos(chat):
    reply = "Put it in boiling water for nine minutes."
    n = len(ids(chat, reply))
    fits = encode(chat, [user("Egg?")], reply, max_reply_tokens=n + 1)
    assert fits.reply_ids == ids(chat, reply) + [chat.eos_token_id] and not fits.reply_truncated
    for window in (n, 5):
        cut = encode(chat, [user("Egg?")], reply, max_reply_tokens=window)
        assert cut.reply_ids == ids(chat, reply)[:window] and cut.reply_truncated


LONG_HISTORY = [
    user("The quick brown fox jumps over the lazy dog."),
    assistant("I cannot help with that, but here is a safer alternative."),
    user("How do I boil an egg?"),
    assistant("Put it in boiling water for nine minutes."),
    user("Answer clearly and kindly: what next?"),
]


@pytest.mark.parametrize("tokenizer_kind", ["chat", "plain"])
def test_prompt_truncation_drops_earliest_exchanges_keeps_instruction(request, tokenizer_kind):
    tokenizer = request.getfixturevalue(tokenizer_kind)
    instruction = "You are a helpful, honest and harmless assistant."

    def length(messages):
        return len(encode_prompt(tokenizer, messages, instruction=instruction, max_prompt_tokens=10**6)[0])

    full = length(LONG_HISTORY)
    assert encode_prompt(tokenizer, LONG_HISTORY, instruction=instruction, max_prompt_tokens=full) == (
        encode_prompt(tokenizer, LONG_HISTORY, instruction=instruction, max_prompt_tokens=10**6)[0], False
    )
    # one token short: the first (user, assistant) exchange goes
    got, truncated = encode_prompt(tokenizer, LONG_HISTORY, instruction=instruction, max_prompt_tokens=full - 1)
    assert truncated
    assert got == ids(tokenizer, render_prompt(tokenizer, LONG_HISTORY[2:], instruction=instruction))
    # only room for the final user message: every earlier turn goes
    last_only = length(LONG_HISTORY[-1:])
    got, _ = encode_prompt(tokenizer, LONG_HISTORY, instruction=instruction, max_prompt_tokens=last_only)
    assert got == ids(tokenizer, render_prompt(tokenizer, LONG_HISTORY[-1:], instruction=instruction))


@pytest.mark.parametrize("tokenizer_kind", ["chat", "plain"])
def test_prompt_truncation_cuts_oldest_tokens_of_last_message(request, tokenizer_kind):
    tokenizer = request.getfixturevalue(tokenizer_kind)
    prompt = [system("Be brief."), *LONG_HISTORY]
    empty = len(encode_prompt(tokenizer, [system("Be brief."), user("")], instruction="Be kind.")[0])
    if tokenizer_kind == "chat":
        head = "<|im_start|>system\nBe kind.\n\nBe brief.<|im_end|>\n<|im_start|>user\n"
        generation_prompt = "<|im_end|>\n<|im_start|>assistant\n"
    else:
        head, generation_prompt = "Be kind.\n\nBe brief.\n\nHuman: ", "\n\nAssistant:"
    for window in (empty, empty + 3, empty + 8):
        got, truncated = encode_prompt(tokenizer, prompt, instruction="Be kind.", max_prompt_tokens=window)
        assert truncated and len(got) <= window
        text = tokenizer.decode(got)
        assert text.startswith(head) and text.endswith(generation_prompt)  # never cut
        assert "The quick" not in text and "How do I" not in text
    got, _ = encode_prompt(tokenizer, prompt, instruction="Be kind.", max_prompt_tokens=empty + 8)
    assert tokenizer.decode(got).endswith("next?" + generation_prompt)  # the newest words survive


def test_prompt_window_too_small_names_origin(chat):
    with pytest.raises(DataError, match=r"demo\.jsonl:7: max_prompt_tokens=5 cannot hold"):
        encode(chat, LONG_HISTORY, "ok", instruction="Be kind.", max_prompt_tokens=5, origin="demo.jsonl:7")


def test_truncation_stats():
    stats = TruncationStats()
    stats.add(Encoded([1], [2], prompt_truncated=True, reply_truncated=False))
    stats.add(Encoded([1], [3], prompt_truncated=True, reply_truncated=True), count_prompt=False)
    assert stats == TruncationStats(prompts=1, prompts_truncated=1, replies=2, replies_truncated=1)
    assert stats.summary() == "prompts truncated 1/1, replies truncated 1/2"
