"""CSV/TSV files and column mapping (``--columns`` / ``data_columns``): pairs, row numbers, errors."""

from __future__ import annotations

import csv
import gzip
import json

import pytest

from rahf import cli
from rahf.config import ConfigError, load_config
from rahf.data import DataError, load_preferences
from rahf.data.formats import parse_columns
from rahf.runs import prepare_data, read_pairs
from rahf.testing import save_tiny

MAPPING = "prompt=question,chosen=good answer,rejected=bad"


def user(text):
    return ({"role": "user", "content": text},)


def write_csv(path, rows, *, delimiter=",", bom=False):
    with open(path, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as handle:
        csv.writer(handle, delimiter=delimiter).writerows(rows)
    return str(path)


ROWS = [
    ["question", "good answer", "bad", "note"],
    ["What is 2+2?", "It is 4, of course.", "5", ""],
    ['Say "hi"', "Hi!\nHow are you?", "Go away.", "two lines"],  # quotes, a newline in a cell
    ["Is NA a reply?", "NA", "None", "pandas would read these as missing"],
]


def test_csv_with_column_mapping_keeps_cells_as_written(tmp_path):
    path = write_csv(tmp_path / "prefs.csv", ROWS, bom=True)  # Excel writes a byte-order mark
    result = load_preferences(path, columns=MAPPING)
    assert result.format == "plain"
    assert [(p.prompt, p.chosen, p.rejected) for p in result.pairs] == [
        (user("What is 2+2?"), "It is 4, of course.", "5"),
        (user('Say "hi"'), "Hi!\nHow are you?", "Go away."),
        (user("Is NA a reply?"), "NA", "None"),
    ]
    # spreadsheet row numbers: the header is row 1, the multi-line cell is one row
    assert [p.origin for p in result.pairs] == [f"{path}:{n}" for n in (2, 3, 4)]


def test_csv_with_standard_names_needs_no_mapping(tmp_path):
    path = write_csv(tmp_path / "p.csv", [["prompt", "chosen", "rejected"], ["q", "good", "bad"]])
    assert load_preferences(path).pairs[0].chosen == "good"


@pytest.mark.parametrize("name,delimiter", [("p.tsv", "\t"), ("p.csv", ";"), ("p.csv", "\t")])
def test_tsv_and_other_delimiters(tmp_path, name, delimiter):
    path = write_csv(tmp_path / name, [["prompt", "chosen", "rejected"], ["a, b; c", "yes", "no"]],
                     delimiter=delimiter)
    pair = load_preferences(path).pairs[0]
    assert (pair.prompt, pair.chosen, pair.rejected) == (user("a, b; c"), "yes", "no")


def test_gzipped_csv(tmp_path):
    path = tmp_path / "p.csv.gz"
    path.write_bytes(gzip.compress(b"prompt,chosen,rejected\nq,yes,no\n"))
    assert load_preferences(str(path)).pairs[0].rejected == "no"


def test_csv_row_errors_name_file_row_and_the_files_column(tmp_path):
    rows = [*ROWS, ["Empty good", "", "x", ""], ["too", "many", "cells", "here", "!"]]
    path = write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(DataError, match=r"bad\.csv: row 5, field 'good answer': empty reply \[empty_reply\]"):
        load_preferences(path, columns=MAPPING)
    result = load_preferences(path, columns=MAPPING, skip_invalid=True)
    assert len(result.pairs) == 3
    assert result.invalid == {"empty_reply": 1, "bad_csv": 1}
    assert result.invalid_rows == [(5, "good answer", "empty_reply"), (6, "(row)", "bad_csv")]


def test_csv_header_problems(tmp_path):
    with pytest.raises(DataError, match=r"dup\.csv: row 1 \(the header\): column 'a' appears twice"):
        load_preferences(write_csv(tmp_path / "dup.csv", [["a", "a", "b"], ["1", "2", "3"]]))
    (tmp_path / "empty.csv").write_text("\n")
    with pytest.raises(DataError, match=r"empty\.csv: no header line"):
        load_preferences(str(tmp_path / "empty.csv"))
    (tmp_path / "latin1.csv").write_bytes("prompt,chosen,rejected\ncaf\xe9,a,b\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.csv: not UTF-8 text"):
        load_preferences(str(tmp_path / "latin1.csv"))


def test_mapped_column_that_does_not_exist_names_file_column_and_columns(tmp_path):
    path = write_csv(tmp_path / "prefs.csv", ROWS)
    with pytest.raises(DataError) as err:
        load_preferences(path, columns="prompt=questions,chosen=good answer,rejected=bad")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: column 'questions' (given for prompt in the column mapping) does not exist")
    assert message.endswith("the columns are 'question', 'good answer', 'bad', 'note'")


def test_mapping_on_jsonl_renames_and_later_rows_missing_a_column_are_row_errors(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [
        {"q": "First?", "good": "Yes.", "bad": "No.", "prompt": "an unrelated prompt column"},
        {"q": "Second?", "bad": "No."},  # no 'good'
        {"q": "Third?", "good": ["not", "text"], "bad": "No."},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    columns = {"prompt": "q", "chosen": "good", "rejected": "bad"}  # a dict works too (YAML config)
    with pytest.raises(DataError, match=r"row 2, field 'good': missing field \(the column mapped to chosen\)"):
        load_preferences(str(path), columns=columns)
    result = load_preferences(str(path), columns=columns, skip_invalid=True)
    assert [p.prompt for p in result.pairs] == [user("First?")]  # the mapped column wins over 'prompt'
    assert result.invalid_rows == [(2, "good", "missing_field"), (3, "good", "wrong_type")]


@pytest.mark.parametrize("spec,message", [
    ("prompt", r"--columns: 'prompt' is not key=column; write e\.g\. prompt=question"),
    ("prompt=q,,chosen=c", r"--columns: '' is not key=column"),
    ("answer=a", r"--columns: unknown key 'answer'; the keys are prompt, chosen, rejected"),
    ("prompt=", r"--columns: no column name after 'prompt='"),
    ("prompt=a,prompt=b", r"--columns: 'prompt' is mapped twice"),
    ("chosen=a,rejected= a", r"--columns: column 'a' is mapped to both chosen and rejected"),
])
def test_malformed_columns(spec, message):
    with pytest.raises(DataError, match=message):
        parse_columns(spec)


def test_parse_columns_strips_spaces_around_names():
    assert parse_columns(" prompt = my question , chosen=a") == {"prompt": "my question", "chosen": "a"}
    assert parse_columns(None) == parse_columns("") == {}


def test_config_key_and_flag_reach_the_pipeline(tmp_path, capsys):
    path = write_csv(tmp_path / "prefs.csv", [ROWS[0]] + [[f"Question {i}?", f"Good {i}.", f"Bad {i}.", ""]
                                                          for i in range(12)])
    config = load_config(None, [f"data={path}", f"data_columns={MAPPING}", "validation_fraction=0.25"])
    assert config.data_columns == {"prompt": "question", "chosen": "good answer", "rejected": "bad"}
    counts = prepare_data(config, tmp_path / "data")
    pairs = read_pairs(tmp_path / "data" / "train.jsonl") + read_pairs(tmp_path / "data" / "validation.jsonl")
    assert counts["train"] + counts["validation"] == 12 and counts["validation"] > 0
    assert sorted(p.chosen for p in pairs) == sorted(f"Good {i}." for i in range(12))

    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("data_columns:\n  prompt: question\n  chosen: good answer\n")
    assert load_config(yaml_file).data_columns == {"prompt": "question", "chosen": "good answer"}
    with pytest.raises(ConfigError, match=r"data_columns: unknown key 'question'"):
        load_config(None, ["data_columns=question=prompt"])

    assert cli.main(["config", "--columns", "prompt=question,chosen=good"]) == 0
    assert "data_columns:\n  prompt: question\n  chosen: good\n" in capsys.readouterr().out
    assert cli.main(["config", "--columns", "prompt"]) == 2
    assert "data_columns: 'prompt' is not key=column" in capsys.readouterr().err


def test_data_inspect_and_eval_take_columns(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAHF_CACHE", str(tmp_path / "cache"))
    model = str(save_tiny(tmp_path / "tiny", layers=1))
    path = write_csv(tmp_path / "prefs.csv", ROWS)
    assert cli.main(["data", "inspect", path, "--columns", MAPPING, "--json", "--model", model]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pairs"] == 3 and report["format"] == "plain"

    assert cli.main(["data", "inspect", path, "--columns", "prompt=nope", "--model", model]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"rahf: error: {path}: column 'nope' (given for prompt in the column mapping) does not exist;"
                   " the columns are 'question', 'good answer', 'bad', 'note'")

    out = tmp_path / "eval"
    assert cli.main(["eval", "--model", model, "--pairs", path, "--columns", MAPPING, "--resamples", "10",
                     "--no-plots", "--quiet", "--out", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["preference"][0]["n"] == 3
    # a malformed mapping stops eval before any model is loaded
    assert cli.main(["eval", "--model", "no/such-model", "--pairs", path, "--columns", "prompt:question",
                     "--out", str(out)]) == 2
    assert "--columns: 'prompt:question' is not key=column" in capsys.readouterr().err
