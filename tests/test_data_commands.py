"""``rahf data inspect`` through ``rahf.cli.main``, with a tiny offline model folder."""

from __future__ import annotations

import json

import pytest

from rahf import cli
from rahf.testing import save_tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("tiny")))


@pytest.fixture
def data_file(tmp_path):
    rows = [
        {"prompt": "How do I boil an egg?", "chosen": "Boil it for nine minutes.", "rejected": "No."},
        {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "  "},
        "{broken",
        {"prompt": "Tell me a long story. " * 20, "chosen": "Once upon a time " * 20, "rejected": "Fine."},
    ]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_inspect_json(capsys, model_dir, data_file):
    code = cli.main(["data", "inspect", data_file, "--skip-invalid", "--json", "--model", model_dir,
                     "--max-prompt-tokens", "64", "--max-reply-tokens", "16"])
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads(out)
    assert report["pairs"] == 2 and report["format"] == "plain"
    assert report["invalid"] == {"bad_json": 1, "empty_reply": 1}
    assert report["invalid_rows"] == [
        {"row": 2, "field": "rejected", "reason": "empty_reply"},
        {"row": 3, "field": "(row)", "reason": "bad_json"},
    ]
    assert report["turns"] == {"min": 1, "median": 1.0, "max": 1}
    assert set(report["tokens"]) == {"prompt", "chosen", "rejected"}
    assert set(report["tokens"]["chosen"]) == {"p50", "p90", "p99", "max"}
    assert report["tokens"]["prompt"]["max"] > 64  # the long story
    assert report["truncation"] == {
        "max_prompt_tokens": 64, "max_reply_tokens": 16,
        "prompts_truncated": 1, "chosen_truncated": 2, "rejected_truncated": 0,
    }


def test_inspect_text(capsys, model_dir, data_file):
    assert cli.main(["data", "inspect", data_file, "--skip-invalid", "--model", model_dir]) == 0
    out = capsys.readouterr().out
    assert "pairs:   2" in out and "format:  plain" in out
    assert "row 2, field 'rejected': empty_reply" in out
    assert "turns per prompt: min 1, median 1.0, max 1" in out


def test_inspect_bad_row_is_a_one_line_error(capsys, model_dir, data_file):
    assert cli.main(["data", "inspect", data_file, "--model", model_dir]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rahf: error: ") and "\n" not in err
    assert "prefs.jsonl: row 2, field 'rejected': empty reply" in err


@pytest.mark.parametrize("argv", [["data", "--help"], ["data", "inspect", "--help"]])
def test_help(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 0
    assert "inspect" in capsys.readouterr().out
