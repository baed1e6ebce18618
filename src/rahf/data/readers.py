"""Read preference data from a file, a saved dataset folder, the hub or the built-in demo set.

``load_preferences`` is the one entry point. Where the rows come from (``_rows``) is separate
from what they mean (``rahf.data.formats``): every source yields ``(row_number, row)`` with
1-based row numbers (line numbers for JSONL, blank lines counted; spreadsheet row numbers for
CSV, so the header is row 1 and the first pair row 2), and every row goes through the same
column mapping, adapter and checks. Bad rows stop the load with a ``DataError`` naming file, row and
field, or are counted and skipped with ``skip_invalid=True``.
"""

from __future__ import annotations

import csv
import gzip
import importlib.resources
import io
import json
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from rahf.data.formats import (
    FORMATS,
    PROMPT,
    WHOLE_ROW,
    RowError,
    detect_format,
    parse_columns,
    parse_row,
    rename_columns,
)
from rahf.data.schema import DataError, LoadResult, PreferencePair

BUILTIN = "builtin"
# A row longer than this is refused (reason ``too_long``): no token window needs a megabyte of
# text, and tokenising one takes tens of seconds in every stage that encodes it.
MAX_ROW_CHARS = 1_000_000
FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".csv", ".csv.gz", ".tsv", ".tsv.gz")
CSV_DELIMITERS = (",", ";", "\t")  # a .csv file's delimiter: the one its header line uses most

Rows = Iterator[tuple[int, Any]]  # (1-based row number, parsed row or a bad_json RowError)


def load_preferences(
    spec: str,
    *,
    format: Literal["auto", "hh", "plain", "conversational", "ultrafeedback"] = "auto",
    skip_invalid: bool = False,
    split: str | None = None,
    config_name: str | None = None,
    limit: int | None = None,
    columns: str | Mapping[str, str] | None = None,
) -> LoadResult:
    """Load preference pairs from ``spec``, checking every row, so later stages never see bad data.

    ``spec`` is ``"builtin"``, a ``.jsonl[.gz]`` / ``.json[.gz]`` / ``.parquet`` /
    ``.csv[.gz]`` / ``.tsv[.gz]`` file, a folder written by ``datasets.Dataset[Dict].save_to_disk``
    or a hub dataset id. ``split`` picks the split of a dataset dict or hub dataset (default
    ``"train"``); ``config_name`` is the hub config. ``format="auto"`` detects the format from
    the first row that looks like one. ``limit`` stops after that many valid pairs.
    ``columns`` maps the standard fields to the file's column names
    (``"prompt=question,chosen=good,rejected=bad"`` or a dict); errors then name the file's columns.
    """
    if format != "auto" and format not in FORMATS:
        raise DataError(f"unknown format '{format}': use auto or one of {', '.join(FORMATS)}")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of pairs, got {limit}")
    mapping = parse_columns(columns)
    rows = _rows(spec, split=split, config_name=config_name)
    return _collect(spec, rows, format=None if format == "auto" else format,
                    skip_invalid=skip_invalid, limit=limit, columns=mapping)


def _check_columns(spec: str, row: Mapping, columns: Mapping[str, str]) -> None:
    """A mapped column absent from the first row is a typo in the mapping, not a bad row."""
    for key, column in columns.items():
        if column not in row:
            have = ", ".join(f"'{name}'" for name in row) or "none"
            raise DataError(
                f"{spec}: column '{column}' (given for {key} in the column mapping) does not exist;"
                f" the columns are {have}"
            )


def _collect(
    spec: str, rows: Iterable[tuple[int, Any]], *, format: str | None, skip_invalid: bool, limit: int | None,
    columns: Mapping[str, str] | None = None,
) -> LoadResult:
    result = LoadResult(pairs=[], format=format or "", source=spec)
    invalid: Counter[str] = Counter()
    columns = dict(columns or {})  # also turns error fields back into the file's column names
    checked = not columns
    seen = 0
    for row_number, row in rows:
        seen += 1
        try:
            if isinstance(row, RowError):
                raise row
            if not checked and isinstance(row, Mapping):
                _check_columns(spec, row, columns)
                checked = True
            row = rename_columns(row, columns)
            if result.format == "":
                detected = detect_format(row)
                if detected is None:
                    # Such a row fits no format; this adapter names its missing/mistyped field.
                    parse_row(row, "plain" if isinstance(row, dict) and PROMPT in row else "hh")
                    raise AssertionError("unreachable: an undetectable row parsed")
                result.format = detected
            prompt, chosen, rejected = parse_row(row, result.format)
            _check_size(prompt, chosen, rejected)
        except RowError as err:
            field = "/".join(columns.get(part, part) for part in err.field.split("/"))
            if not skip_invalid:
                raise DataError(
                    f"{spec}: row {row_number}, field '{field}': {err.words} [{err.reason}]"
                    " (use --skip-invalid / skip_invalid=True to skip such rows)"
                ) from None
            invalid[err.reason] += 1
            result.invalid_rows.append((row_number, field, err.reason))
            continue
        result.pairs.append(PreferencePair(prompt, chosen, rejected, origin=f"{spec}:{row_number}"))
        if limit is not None and len(result.pairs) >= limit:
            break
    if seen == 0:
        raise DataError(f"{spec}: no rows")
    result.invalid = dict(invalid)
    if not result.pairs:
        counts = ", ".join(f"{reason}: {n}" for reason, n in invalid.most_common())
        raise DataError(f"{spec}: no valid pairs in {seen} rows ({counts})")
    return result


def _check_size(prompt: tuple, chosen: str, rejected: str) -> None:
    sizes = {PROMPT: sum(len(m["content"]) for m in prompt), "chosen": len(chosen), "rejected": len(rejected)}
    total = sum(sizes.values())
    if total > MAX_ROW_CHARS:
        field = max(sizes, key=sizes.__getitem__)
        raise RowError(
            field, "too_long",
            f"{total:,} characters, {sizes[field]:,} of them in '{field}'; the limit is {MAX_ROW_CHARS:,} per row",
        )


# -- sources --------------------------------------------------------------------------------


def _rows(spec: str, *, split: str | None, config_name: str | None) -> Rows:
    if spec == BUILTIN:
        resource = importlib.resources.files("rahf.data").joinpath("builtin/demo.jsonl")
        if not resource.is_file():
            raise DataError("the built-in demo dataset is missing: reinstall rahf")
        with importlib.resources.as_file(resource) as path:
            # materialise: as_file's temporary copy (zip installs) is gone after the block
            return iter(list(_jsonl(path, spec)))
    path = Path(spec).expanduser()
    if path.is_dir():
        return _saved_dataset(path, spec, split)
    if path.is_file():
        name = path.name.lower()
        if name.endswith((".jsonl", ".jsonl.gz")):
            return _jsonl(path, spec)
        if name.endswith((".json", ".json.gz")):
            return _json(path, spec)
        if name.endswith(".parquet"):
            return _parquet(path, spec)
        if name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz")):
            return _csv(path, spec)
        raise DataError(f"{spec}: unsupported file type; expected one of {', '.join(FILE_SUFFIXES)}")
    if _looks_local(spec):
        raise DataError(f"{spec}: no such file or folder")
    return _hub(spec, split, config_name)


def _looks_local(spec: str) -> bool:
    """Paths, not hub ids ("owner/name" or "name"): a nonexistent one is a typo, not a download."""
    return (
        spec.startswith((".", "/", "~"))
        or spec.count("/") > 1
        or "\\" in spec
        or spec.lower().endswith(FILE_SUFFIXES)
    )


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _jsonl(path: Path, label: str) -> Rows:
    try:
        with _open_bytes(path) as lines:
            for number, raw in enumerate(lines, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(
                        f"{label}: row {number}: line {number} is not UTF-8 text (byte {err.start + 1}"
                        " of the line); re-save the file as UTF-8"
                    ) from None
                if number == 1:
                    line = line.removeprefix("\ufeff")
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as err:
                    yield number, RowError(
                        WHOLE_ROW, "bad_json", f"line {number} column {err.colno}: {err.msg}"
                    )
                except RecursionError:
                    yield number, RowError(WHOLE_ROW, "bad_json", f"line {number}: nested too deeply")
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise DataError(f"{label}: not a valid gzip file ({err})") from None


def _json(path: Path, label: str) -> Rows:
    try:
        with _open_bytes(path) as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise DataError(f"{label}: not a valid gzip file ({err})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"{label}: line {line} is not UTF-8 text; re-save the file as UTF-8") from None
    if not text.strip():
        raise DataError(f"{label}: no rows")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{label}: not valid JSON (line {err.lineno} column {err.colno}: {err.msg})"
        ) from None
    except RecursionError:
        raise DataError(f"{label}: not valid JSON (nested too deeply)") from None
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        doc = doc["data"]
    if not isinstance(doc, list):
        raise DataError(f'{label}: expected a JSON list of objects or {{"data": [...]}}')
    return iter(enumerate(doc, 1))


def _parquet(path: Path, label: str) -> Rows:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{label}: not a readable parquet file ({err})") from None
    number = 0
    try:
        for batch in table.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                number += 1
                yield number, row
    except (pa.ArrowException, OSError) as err:  # a damaged data page, found while reading
        raise DataError(f"{label}: not a readable parquet file after row {number} ({err})") from None


def _csv(path: Path, label: str) -> Rows:
    """Rows of a CSV/TSV file with a header line; every cell is a string (an empty cell is "").

    Read with the standard library, not pandas, so that cells stay the text in the file
    ("NA", "None", "0042" are replies too) and row numbers match a spreadsheet's.
    """
    csv.field_size_limit(max(csv.field_size_limit(), MAX_ROW_CHARS + 1))  # longer rows: too_long
    number = 0
    try:
        with _open_bytes(path) as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as text:
            first = text.readline()
            if not first.strip():
                raise DataError(f"{label}: no header line (the first line must name the columns)")
            tsv = path.name.lower().endswith((".tsv", ".tsv.gz"))
            delimiter = "\t" if tsv else max(CSV_DELIMITERS, key=first.count)
            reader = csv.reader(_chain(first, text), delimiter=delimiter)
            header = [name.strip() for name in next(reader)]
            number = 1
            duplicates = sorted({name for name in header if header.count(name) > 1})
            if duplicates or not all(header):
                problem = f"column '{duplicates[0]}' appears twice" if duplicates else "a column has no name"
                raise DataError(f"{label}: row 1 (the header): {problem}; every column needs a unique name")
            for number, cells in enumerate(reader, 2):
                if not cells or (len(cells) == 1 and not cells[0].strip() and len(header) > 1):
                    continue  # a blank line
                if len(cells) != len(header):
                    yield number, RowError(
                        WHOLE_ROW, "bad_csv", f"{len(cells)} cells, but the header names {len(header)} columns"
                    )
                    continue
                yield number, dict(zip(header, cells, strict=True))
    except UnicodeDecodeError:
        raise DataError(f"{label}: not UTF-8 text (after row {number}); re-save the file as UTF-8") from None
    except csv.Error as err:
        raise DataError(f"{label}: row {number + 1}: not valid CSV ({err})") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise DataError(f"{label}: not a valid gzip file ({err})") from None


def _chain(first: str, rest: Iterable[str]) -> Iterator[str]:
    yield first
    yield from rest


def _saved_dataset(path: Path, label: str, split: str | None) -> Rows:
    if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        raise DataError(
            f"{label}: a folder, but not one written by datasets' save_to_disk"
            " (no dataset_dict.json or state.json); pass a data file instead"
        )
    from datasets import DatasetDict, load_from_disk

    dataset = load_from_disk(str(path))
    if isinstance(dataset, DatasetDict):
        dataset = _pick_split(dataset, split or "train", label)
    return iter(enumerate(dataset, 1))


def _pick_split(dataset: Any, split: str, label: str) -> Any:
    if split not in dataset:
        raise DataError(f"{label}: no split '{split}'; it has {', '.join(dataset)} (use --split)")
    return dataset[split]


def _hub(spec: str, split: str | None, config_name: str | None) -> Rows:
    from datasets import load_dataset

    try:
        dataset = load_dataset(spec, config_name, split=split or "train")
    except Exception as err:  # offline, unknown id/config/split: all are the user's to fix
        raise DataError(
            f"{spec}: not a local file or folder, and loading it as a hub dataset failed"
            f" ({type(err).__name__}: {err})"
        ) from err
    return iter(enumerate(dataset, 1))
