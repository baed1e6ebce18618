"""Format adapters, auto-detection and every invalid-row reason (raise by default, count on skip)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rahf.data import DataError, load_preferences


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows that are strings are written verbatim (to make broken lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def hh(*turns: str) -> str:
    """An HH transcript from alternating Human/Assistant texts, starting with Human."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


PLAIN = {"prompt": "Boil an egg?", "chosen": "Nine minutes.", "rejected": "No."}
HH = {"chosen": hh("Hi", "Hello!", "Boil an egg?", "Nine minutes."),
      "rejected": hh("Hi", "Hello!", "Boil an egg?", "No.")}
CONVERSATIONAL = {"chosen": [user("Boil an egg?"), assistant("Nine minutes.")],
                  "rejected": [user("Boil an egg?"), assistant("No.")]}
ULTRAFEEDBACK = {"prompt": "Boil an egg?", "prompt_id": "x", "score_chosen": 9.0,
                 "chosen": [user("Boil an egg?"), assistant("Nine minutes.")],
                 "rejected": [user("Boil an egg?"), assistant("No.")]}
REFERENCE_SPLIT = {"prompt": "Boil an egg?", "chosen_response": "Nine minutes.",
                   "rejected_respomse": "No."}


# -- adapters and detection -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "expected_format"),
    [
        (PLAIN, "plain"),
        ({**PLAIN, "category": "cooking", "id": 3}, "plain"),
        (CONVERSATIONAL, "conversational"),
        ({**CONVERSATIONAL, "prompt": [user("Boil an egg?")],
          "chosen": [assistant("Nine minutes.")], "rejected": [assistant("No.")]}, "conversational"),
        (ULTRAFEEDBACK, "ultrafeedback"),
        (REFERENCE_SPLIT, "ultrafeedback"),
        ({"prompt": "Boil an egg?", "chosen_response": "Nine minutes.", "rejected_response": "No."},
         "ultrafeedback"),
    ],
)
def test_single_turn_formats_detected_and_parsed(tmp_path, row, expected_format):
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    for fmt in ("auto", expected_format):
        result = load_preferences(str(path), format=fmt)
        assert result.format == expected_format
        assert result.source == str(path)
        (pair,) = result.pairs
        assert pair.prompt == ({"role": "user", "content": "Boil an egg?"},)
        assert (pair.chosen, pair.rejected) == ("Nine minutes.", "No.")
        assert pair.origin == f"{path}:1"


def test_hh_multi_turn_prompt_is_shared_prefix(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [HH])
    result = load_preferences(str(path))
    assert result.format == "hh"
    (pair,) = result.pairs
    assert pair.prompt == (user("Hi"), assistant("Hello!"), user("Boil an egg?"))
    assert (pair.chosen, pair.rejected) == ("Nine minutes.", "No.")


def test_conversational_without_prompt_keeps_system_and_history(tmp_path):
    history = [system("Be brief."), user("Hi"), assistant("Hello!"), user("Egg?")]
    row = {"chosen": [*history, assistant("Boil it.")], "rejected": [*history, assistant("No.")]}
    pair = load_preferences(str(write_jsonl(tmp_path / "c.jsonl", [row]))).pairs[0]
    assert pair.prompt == tuple(history)
    assert (pair.chosen, pair.rejected) == ("Boil it.", "No.")


def test_conversational_prompt_string_with_reply_lists(tmp_path):
    row = {"prompt": [system("Be brief."), user("Egg?")],
           "chosen": [assistant("Boil it.")], "rejected": [assistant("No.")]}
    pair = load_preferences(str(write_jsonl(tmp_path / "c.jsonl", [row]))).pairs[0]
    assert pair.prompt == (system("Be brief."), user("Egg?"))


def test_explicit_format_overrides_detection(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [HH])
    with pytest.raises(DataError, match=r"row 1, field 'prompt': missing field"):
        load_preferences(str(path), format="plain")
    with pytest.raises(DataError, match="unknown format"):
        load_preferences(str(path), format="dpo")  # type: ignore[arg-type]


def test_limit_stops_after_n_valid_pairs(tmp_path):
    rows = [{**PLAIN, "chosen": f"yes {i}"} for i in range(5)]
    path = write_jsonl(tmp_path / "d.jsonl", ["not json", *rows])
    result = load_preferences(str(path), skip_invalid=True, limit=2)
    assert [p.chosen for p in result.pairs] == ["yes 0", "yes 1"]
    assert [p.origin for p in result.pairs] == [f"{path}:2", f"{path}:3"]


# -- invalid rows ---------------------------------------------------------------------------

# (valid first row that fixes the format, bad second row, reason, field)
INVALID_CASES = [
    pytest.param(PLAIN, {"prompt": "p", "chosen": "a"}, "missing_field", "rejected", id="missing"),
    pytest.param(PLAIN, {"prompt": "p", "chosen": 5, "rejected": "b"}, "wrong_type", "chosen",
                 id="wrong_type"),
    pytest.param(CONVERSATIONAL, {"chosen": [user("q"), {"role": "assistant", "content": 3}],
                                  "rejected": [user("q"), assistant("b")]},
                 "wrong_type", "chosen", id="wrong_type_content"),
    pytest.param(CONVERSATIONAL, {"chosen": "a", "rejected": [assistant("b")]},
                 "wrong_type", "chosen", id="wrong_type_not_a_list"),
    pytest.param(PLAIN, {"prompt": "p", "chosen": "a", "rejected": "  \n"}, "empty_reply", "rejected",
                 id="empty_reply"),
    pytest.param(PLAIN, {"prompt": " ", "chosen": "a", "rejected": "b"}, "empty_prompt", "prompt",
                 id="empty_prompt"),
    pytest.param(PLAIN, {"prompt": "p", "chosen": "same", "rejected": " same "},
                 "identical_replies", "chosen/rejected", id="identical"),
    pytest.param(PLAIN, '{"prompt": "p", "chosen": ', "bad_json", "(row)", id="bad_json"),
    pytest.param(PLAIN, "[1, 2]", "not_an_object", "(row)", id="not_an_object"),
    pytest.param(HH, {"chosen": hh("Hi", "a"), "rejected": hh("Hello", "b")},
                 "prompt_mismatch", "chosen/rejected", id="prompt_mismatch"),
    pytest.param(HH, {"chosen": hh("Hi", "a", "more?"), "rejected": hh("Hi", "b")},
                 "malformed_transcript", "chosen", id="hh_ends_with_human"),
    pytest.param(HH, {"chosen": "\n\nAssistant: a", "rejected": "\n\nAssistant: b"},
                 "malformed_transcript", "chosen", id="hh_no_human"),
    pytest.param(HH, {"chosen": "\n\nHuman: q\n\nAssistant: x\n\nAssistant: a",
                      "rejected": "\n\nHuman: q\n\nAssistant: x\n\nAssistant: b"},
                 "malformed_transcript", "prompt", id="hh_prompt_ends_with_assistant"),
    pytest.param(CONVERSATIONAL, {"chosen": [user("q"), {"role": "tool", "content": "a"}],
                                  "rejected": [user("q"), assistant("b")]},
                 "bad_role", "chosen", id="bad_role"),
    pytest.param(CONVERSATIONAL, {"prompt": [user("q"), assistant("x")], "chosen": [assistant("a")],
                                  "rejected": [assistant("b")]},
                 "bad_role", "prompt", id="prompt_ends_with_assistant"),
    pytest.param(CONVERSATIONAL, {"chosen": [user("q"), system("s"), assistant("a")],
                                  "rejected": [user("q"), system("s"), assistant("b")]},
                 "misplaced_system", "chosen", id="misplaced_system"),
]


@pytest.mark.parametrize(("valid", "bad", "reason", "field"), INVALID_CASES)
def test_invalid_row_raises_with_file_row_field_then_skips(tmp_path, valid, bad, reason, field):
    path = write_jsonl(tmp_path / "prefs.jsonl", [valid, bad, valid])
    with pytest.raises(DataError) as err:
        load_preferences(str(path))
    message = str(err.value)
    assert str(path) in message and "row 2" in message and f"field '{field}'" in message
    assert f"[{reason}]" in message

    result = load_preferences(str(path), skip_invalid=True)
    assert len(result.pairs) == 2
    assert result.invalid == {reason: 1}
    assert result.invalid_rows == [(2, field, reason)]
    assert [p.origin for p in result.pairs] == [f"{path}:1", f"{path}:3"]


def test_bad_json_line_7_named_and_rest_loaded(tmp_path):
    rows: list = [{**PLAIN, "chosen": f"yes {i}"} for i in range(10)]
    rows[6] = '{"prompt": "p", "chosen": "a", "rejected": }'
    path = write_jsonl(tmp_path / "broken.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_preferences(str(path))
    assert "broken.jsonl" in str(err.value)
    assert "row 7" in str(err.value) and "line 7" in str(err.value)
    result = load_preferences(str(path), skip_invalid=True)
    assert len(result.pairs) == 9
    assert result.invalid == {"bad_json": 1}
    assert result.invalid_rows == [(7, "(row)", "bad_json")]


def test_undetectable_first_row_reports_missing_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q"}, PLAIN])
    with pytest.raises(DataError, match=r"row 1, field 'chosen': missing field"):
        load_preferences(str(path))
    result = load_preferences(str(path), skip_invalid=True)
    assert (result.format, len(result.pairs), result.invalid) == ("plain", 1, {"missing_field": 1})


def test_no_valid_rows_after_skipping_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["oops", {**PLAIN, "rejected": PLAIN["chosen"]}])
    with pytest.raises(DataError, match=r"no valid pairs in 2 rows \(bad_json: 1, identical_replies: 1\)"):
        load_preferences(str(path), skip_invalid=True)
