"""One padding helper and one plain-text renderer serve training, scoring, generation and reward models."""

from __future__ import annotations

import torch

from rahf.data.render import SEPARATOR, render_plain, render_prompt
from rahf.evaluate.reward import render_for_reward
from rahf.hidden_states import pad_ids
from rahf.testing import tiny_tokenizer

CONVERSATION = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Egg?"},
]


def test_pad_ids_right_and_left():
    rows = [[5, 6, 7], [8], []]
    ids, mask = pad_ids(rows, 0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    ids, mask = pad_ids(rows, 9, side="left")  # generation: new tokens start at one column
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8], [9, 9, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long


def test_reward_model_text_is_the_training_prompt_plus_the_reply():
    plain = tiny_tokenizer(chat_template=False)
    expected = "Be kind.\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Egg?\n\nAssistant: Nine minutes."
    assert render_for_reward(plain, CONVERSATION, "Nine minutes.") == expected + plain.eos_token
    assert render_prompt(plain, CONVERSATION) == render_plain(CONVERSATION) == expected.removesuffix(" Nine minutes.")
    assert render_plain(CONVERSATION, instruction="Be brief.").startswith("Be brief." + SEPARATOR + "Be kind.")
