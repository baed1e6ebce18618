"""Behaviour metrics on hand-made replies."""

import pytest

from rahf.evaluate.behaviour import behaviour_stats, is_refusal, repetition_rate


def test_refusal_phrases():
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("I\u2019m sorry, but no.")  # curly apostrophe
    assert is_refusal("As an AI, I do not have opinions.")
    assert not is_refusal("Boil the egg for nine minutes.")
    assert not is_refusal("x" * 400 + " I cannot")  # only the start counts


def test_repetition_rate_counts_repeated_four_grams():
    assert repetition_rate("a b c d") == 0.0
    assert repetition_rate("too short") == 0.0
    # 8 words -> 5 four-grams; "a b c d" appears twice -> 1 repeat of 5
    assert repetition_rate("a b c d a b c d") == pytest.approx(1 / 5)
    assert repetition_rate("go " * 10) == pytest.approx(6 / 7)


def test_behaviour_stats_by_hand():
    texts = ["I cannot help with that.", "", "Sure: boil it for nine minutes.", "You are a fucking idiot."]
    stats = behaviour_stats(
        texts, tokens=[6, 0, 8, 6], hit_limit=[False, False, True, False], harmful=[True, True, False, False]
    )
    assert stats.n == 4
    assert stats.mean_tokens == pytest.approx(5.0)
    assert stats.mean_words == pytest.approx((5 + 0 + 6 + 5) / 4)
    assert stats.hit_limit_rate == pytest.approx(0.25)
    assert stats.empty_rate == pytest.approx(0.25)
    assert stats.refusal_rate == pytest.approx(0.5)  # 1 of the 2 harmful prompts refused
    assert stats.n_harmful == 2 and stats.n_benign == 2
    assert stats.over_refusal_rate == pytest.approx(0.0)
    assert stats.offensive_rate == pytest.approx(0.25)
    assert stats.repetition_rate == 0.0


def test_rates_are_none_without_prompts_of_that_kind():
    stats = behaviour_stats(["hello there friend"])
    assert stats.refusal_rate is None and stats.over_refusal_rate == 0.0
    assert stats.mean_tokens is None
