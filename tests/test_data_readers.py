"""Sources: JSONL(.gz), JSON, parquet, save_to_disk folders, the built-in set, and their errors."""

from __future__ import annotations

import gzip
import importlib.resources
import json
from pathlib import Path

import pytest

from rahf.data import DataError, load_preferences

ROWS = [
    {"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad answer {i}."}
    for i in range(3)
]


def check(result, source: str) -> None:
    assert result.format == "plain"
    assert [p.chosen for p in result.pairs] == ["Good answer 0.", "Good answer 1.", "Good answer 2."]
    assert [p.origin for p in result.pairs] == [f"{source}:{i}" for i in (1, 2, 3)]


def test_jsonl_gz(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in ROWS)
    check(load_preferences(str(path)), str(path))


def test_jsonl_blank_lines_keep_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\ufeff" + json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    result = load_preferences(str(path))
    assert [p.origin for p in result.pairs] == [f"{path}:1", f"{path}:3"]


@pytest.mark.parametrize("wrap", [False, True])
def test_json_list_or_data_key(tmp_path, wrap):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": ROWS} if wrap else ROWS, indent=2))
    check(load_preferences(str(path)), str(path))


def test_json_not_a_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"rows": ROWS}))
    with pytest.raises(DataError, match=r"d\.json: expected a JSON list"):
        load_preferences(str(path))
    path.write_text('[{"prompt": 1,}]')
    with pytest.raises(DataError, match=r"d\.json: not valid JSON \(line 1"):
        load_preferences(str(path))


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    check(load_preferences(str(path)), str(path))


def test_save_to_disk_dataset_and_dict(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_list(ROWS).save_to_disk(tmp_path / "single")
    check(load_preferences(str(tmp_path / "single")), str(tmp_path / "single"))

    folder = str(tmp_path / "dict")
    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS[:1])}).save_to_disk(folder)
    check(load_preferences(folder), folder)
    assert len(load_preferences(folder, split="test").pairs) == 1
    with pytest.raises(DataError, match="no split 'dev'; it has train, test"):
        load_preferences(folder, split="dev")


def test_folder_that_is_not_a_saved_dataset(tmp_path):
    with pytest.raises(DataError, match="not one written by datasets' save_to_disk"):
        load_preferences(str(tmp_path))


@pytest.mark.parametrize("content", [b"", b"\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"empty\.jsonl: no rows"):
        load_preferences(str(path))


def test_empty_json_list(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("[]")
    with pytest.raises(DataError, match="no rows"):
        load_preferences(str(path))


def test_non_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    lines = [json.dumps(r).encode() for r in ROWS]
    lines[1] = '{"prompt": "café", "chosen": "a", "rejected": "b"}'.encode("latin-1")
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=r"latin1\.jsonl: row 2: line 2 is not UTF-8"):
        load_preferences(str(path), skip_invalid=True)


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(DataError, match=r"\./nope\.jsonl: no such file"):
        load_preferences("./nope.jsonl")
    with pytest.raises(DataError, match="no such file"):
        load_preferences(str(tmp_path / "a" / "b.parquet"))


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "d.xlsx"  # (.csv was the example until CSV became a supported type)
    path.write_text("prompt,chosen,rejected\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_preferences(str(path))


def test_bad_limit():
    with pytest.raises(DataError, match="limit must be"):
        load_preferences("builtin", limit=0)


def test_builtin():
    resource = importlib.resources.files("rahf.data").joinpath("builtin/demo.jsonl")
    if not resource.is_file():
        pytest.skip("the built-in demo set is not written yet")
    result = load_preferences("builtin")
    assert result.format == "plain" and result.source == "builtin"
    assert result.pairs and result.pairs[0].origin == "builtin:1"
    assert not result.invalid


def test_gz_that_is_not_gzip(tmp_path):
    path = Path(tmp_path / "d.jsonl.gz")
    path.write_text(json.dumps(ROWS[0]))
    with pytest.raises(DataError, match="not a valid gzip file"):
        load_preferences(str(path))
