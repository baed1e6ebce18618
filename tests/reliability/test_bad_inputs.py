"""The bad-input corpus: every case is refused before any work, in one line, with no traceback.

Each case writes its file(s) into ``tmp_path/bad_inputs/`` and runs ``rahf align --dry-run``
(or ``rahf data inspect``) in-process; the message must name the file and row and field, or the
config key. A few cases run as fresh interpreters to prove the whole stderr is that one line.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from reliability.runner import run_subprocess

GOOD = {"prompt": "What is two plus two?", "chosen": "Four.", "rejected": "Who knows."}


def jsonl(*rows: object) -> bytes:
    return ("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n").encode()


def hh(*turns: str) -> str:
    return "".join(f"\n\n{turn}" for turn in turns)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def parquet(columns: dict[str, list]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table(columns), path)

    return write


@dataclass
class Case:
    """``content``: bytes, a writer, "dir" (an ordinary folder) or None (no file at all)."""

    file: str
    content: bytes | Callable[[Path], None] | str | None
    expect: list[str]  # fragments of the error line; "{path}" is the data file
    args: list[str] = field(default_factory=list)
    command: str = "align"  # or "inspect"


def _deep() -> bytes:
    return ("[" * 100_000 + "]" * 100_000 + "\n").encode()


DATA_CASES: dict[str, Case] = {
    "broken_json_line": Case("broken.jsonl", jsonl(GOOD, '{"prompt": "x", "chosen": '), ["{path}: row 2, field '(row)': not valid JSON"]),
    "truncated_json_file": Case("truncated.json", b'[{"prompt": "a", "chosen": "b"', ["{path}: not valid JSON (line 1 column"]),
    "row_not_an_object": Case("list_row.jsonl", jsonl(GOOD, '["a", "b"]'), ["{path}: row 2, field '(row)': row is not a JSON object"]),
    "prompt_wrong_type": Case("int_prompt.jsonl", jsonl({**GOOD, "prompt": 5}), ["{path}: row 1, field 'prompt': wrong type (expected string, got int)"]),
    "chosen_null": Case("null.jsonl", jsonl(GOOD, {**GOOD, "chosen": None}), ["{path}: row 2, field 'chosen': missing field"]),
    "missing_rejected": Case("missing.jsonl", jsonl(GOOD, {"prompt": "x", "chosen": "a"}), ["{path}: row 2, field 'rejected': missing field"]),
    "empty_chosen": Case("empty_reply.jsonl", jsonl({**GOOD, "chosen": ""}), ["{path}: row 1, field 'chosen': empty reply"]),
    "blank_prompt": Case("blank_prompt.jsonl", jsonl({**GOOD, "prompt": "   "}), ["{path}: row 1, field 'prompt': empty prompt"]),
    "chosen_equals_rejected": Case("same.jsonl", jsonl({**GOOD, "rejected": "Four."}), ["{path}: row 1, field 'chosen/rejected': chosen and rejected replies are identical"]),
    "same_after_whitespace": Case("same_ws.jsonl", jsonl({**GOOD, "rejected": "  Four.\n"}), ["{path}: row 1, field 'chosen/rejected': chosen and rejected replies are identical"]),
    "hh_mismatched_transcripts": Case(
        "hh_mismatch.jsonl",
        jsonl({"chosen": hh("Human: Hi", "Assistant: Hello"), "rejected": hh("Human: Hey", "Assistant: Go away")}),
        ["{path}: row 1, field 'chosen/rejected': chosen and rejected have different prompts"],
    ),
    "hh_ends_with_human": Case(
        "hh_end.jsonl",
        jsonl({"chosen": hh("Human: Hi", "Assistant: Hello", "Human: More?"), "rejected": hh("Human: Hi", "Assistant: No")}),
        ["{path}: row 1, field 'chosen': malformed transcript (the last turn is not an 'Assistant:' turn)"],
    ),
    "hh_text_before_first_turn": Case(
        "hh_preamble.jsonl",
        jsonl({"chosen": "Intro" + hh("Human: Hi", "Assistant: Hello"), "rejected": hh("Human: Hi", "Assistant: No")}),
        ["{path}: row 1, field 'chosen': malformed transcript (text before the first 'Human:' turn)"],
    ),
    "unknown_role": Case(
        "role.jsonl",
        jsonl({"chosen": [user("Hi"), {"role": "bot", "content": "Hello"}], "rejected": [user("Hi"), assistant("No")]}),
        ["{path}: row 1, field 'chosen': bad role (message 1 has role 'bot')"],
    ),
    "system_turn_not_first": Case(
        "system.jsonl",
        jsonl({"chosen": [user("Hi"), {"role": "system", "content": "Be nice"}, assistant("Hello")],
               "rejected": [user("Hi"), assistant("No")]}),
        ["{path}: row 1, field 'chosen': a system message is allowed only as the first message (message 1)"],
    ),
    "message_without_content": Case(
        "no_content.jsonl",
        jsonl({"chosen": [{"role": "user"}, assistant("Hello")], "rejected": [user("Hi"), assistant("No")]}),
        ["{path}: row 1, field 'chosen': missing field (message 0 has no 'content')"],
    ),
    "reply_not_from_assistant": Case(
        "reply_role.jsonl",
        jsonl({"prompt": [user("Hi")], "chosen": [user("Hello")], "rejected": [assistant("No")]}),
        ["{path}: row 1, field 'chosen': bad role (the reply must be an assistant message, not user)"],
    ),
    "message_not_an_object": Case(
        "msg_type.jsonl",
        jsonl({"chosen": ["Hi", assistant("Hello")], "rejected": [user("Hi"), assistant("No")]}),
        ["{path}: row 1, field 'chosen': wrong type (message 0 is str, not an object)"],
    ),
    "non_utf8_jsonl": Case("latin1.jsonl", jsonl(GOOD) + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n', ["{path}: row 2: line 2 is not UTF-8 text"]),
    "non_utf8_json": Case("latin1.json", b'[\n{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}]', ["{path}: line 2 is not UTF-8 text"]),
    "ten_megabyte_row": Case(
        "big.jsonl", jsonl({**GOOD, "chosen": "word " * 2_000_000}),
        ["{path}: row 1, field 'chosen': row too long (10,000,0", "the limit is 1,000,000 per row"],
    ),
    "deeply_nested_json": Case("deep.jsonl", _deep(), ["{path}: row 1, field '(row)': not valid JSON (line 1: nested too deeply)"]),
    "empty_jsonl": Case("empty.jsonl", b"", ["{path}: no rows"]),
    "empty_json": Case("empty.json", b"", ["{path}: no rows"]),
    "only_blank_lines": Case("blank.jsonl", b"\n\n  \n", ["{path}: no rows"]),
    "json_object_not_list": Case("object.json", b'{"rows": []}', ['{path}: expected a JSON list of objects or {{"data": [...]}}']),
    "directory_instead_of_file": Case("a_folder", "dir", ["{path}: a folder, but not one written by datasets' save_to_disk"]),
    "parquet_wrong_columns": Case("wrong.parquet", parquet({"question": ["a"], "answer": ["b"]}), ["{path}: row 1, field 'chosen': missing field"]),
    "not_a_parquet": Case("fake.parquet", b"hello", ["{path}: not a readable parquet file"]),
    "broken_gzip": Case("broken.jsonl.gz", gzip.compress(jsonl(GOOD))[:20], ["{path}: not a valid gzip file"]),
    "unsupported_extension": Case("pairs.xlsx", b"prompt,chosen,rejected\n", ["{path}: unsupported file type; expected one of .jsonl"]),
    "csv_header_only": Case("header.csv", b"prompt,chosen,rejected\n", ["{path}: no rows"]),
    "csv_ragged_row": Case(
        "ragged.csv", b"prompt,chosen,rejected\nHi,Hello\n",
        ["{path}: row 2, field '(row)': not a valid CSV row (2 cells, but the header names 3 columns)"],
    ),
    "csv_duplicate_column": Case("dup.csv", b"prompt,chosen,chosen\nHi,a,b\n", ["{path}: row 1 (the header): column 'chosen' appears twice"]),
    "mapped_column_missing": Case(
        "mapped.csv", b"question,good,bad\nHi,Hello,No\n",
        ["{path}: column 'prompt_text' (given for prompt in the column mapping) does not exist;"
         " the columns are 'question', 'good', 'bad'"],
        args=["--columns", "prompt=prompt_text,chosen=good,rejected=bad"],
    ),
    "mapped_reply_empty": Case(
        "mapped_empty.csv", b"question,good,bad\nHi,,No\n", ["{path}: row 2, field 'good': empty reply"],
        args=["--columns", "prompt=question,chosen=good,rejected=bad"],
    ),
    "columns_malformed": Case("cols.jsonl", jsonl(GOOD), ["data_columns: 'prompt:question' is not key=column"],
                              args=["--columns", "prompt:question"]),
    "inspect_columns_unknown_key": Case(
        "inspect_cols.jsonl", jsonl(GOOD), ["--columns: ", "data_columns: unknown key 'answer'; the keys are prompt, chosen, rejected"],
        command="inspect", args=["--columns", "answer=a"],
    ),
    "missing_file": Case("nowhere.jsonl", None, ["{path}: no such file or folder"]),
    "all_rows_invalid_skipped": Case(
        "all_bad.jsonl", jsonl({**GOOD, "rejected": "Four."}, {**GOOD, "chosen": "x", "rejected": "x"}),
        ["{path}: no valid pairs in 2 rows (identical_replies: 2)"], args=["--skip-invalid"],
    ),
    "ultrafeedback_missing_reply": Case(
        "uf.jsonl", jsonl({"prompt": "Hi", "chosen_response": "Hello"}), ["{path}: row 1, field 'rejected_respomse': missing field"],
    ),
    "forced_format_does_not_fit": Case("plain.jsonl", jsonl(GOOD), ["{path}: row 1, field 'chosen': malformed transcript"], args=["--format", "hh"]),
    "no_training_pairs_left": Case(
        "one.jsonl", jsonl(GOOD), ["{path}: no training pairs left after filtering and the validation split"],
        args=["--set", "validation_fraction=0.99"],
    ),
    "window_cannot_hold_instruction": Case(
        "window.jsonl", jsonl(GOOD), ["{path}:1: max_prompt_tokens=9 cannot hold even the instruction"],
        args=["--method", "scit", "--set", "max_prompt_tokens=9"],
    ),
    "inspect_non_utf8": Case("inspect.jsonl", b'{"prompt": "\xff"}\n', ["{path}: row 1: line 1 is not UTF-8 text"], command="inspect"),
    "inspect_identical": Case("inspect_same.jsonl", jsonl({**GOOD, "rejected": "Four."}), ["{path}: row 1, field 'chosen/rejected'"], command="inspect"),
}

# Config cases: (YAML text or None, extra flags, fragments naming the key).
CONFIG_CASES: dict[str, tuple[str | None, list[str], list[str]]] = {
    "unknown_key_yaml": ("lerning_rate: 0.1\n", [], ["{config}: unknown config key 'lerning_rate'"]),
    "unknown_nested_key": ("fit:\n  lora:\n    rank: 4\n", [], ["{config}: unknown config key 'fit.lora.rank'"]),
    "unknown_key_set": (None, ["--set", "fit.trian.max_steps=3"], ["unknown config key 'fit.trian' (did you mean 'fit.train'?)"]),
    "target_layer_out_of_range": (None, ["--target-layers", "1,9"], ["patterns.target_layers [9] out of range", "valid hidden_states indices are 1..2"]),
    "target_layer_zero": (None, ["--target-layers", "0"], ["patterns.target_layers [0] out of range"]),
    "target_layer_not_a_number": (None, ["--target-layers", "one"], ["patterns.target_layers[0] must be an integer"]),
    "negative_alpha": (None, ["--alpha", "-1"], ["patterns.alpha must be >= 0"]),
    "alpha_not_finite": (None, ["--alpha", "nan"], ["patterns.alpha must be a finite number"]),
    "lora_rank_zero": (None, ["--set", "fit.lora.r=0"], ["fit.lora.r (LoRA rank) must be an integer >= 1, got 0"]),
    "step1_rank_zero_yaml": ("step1:\n  lora:\n    r: 0\n", [], ["{config}: step1.lora.r (LoRA rank) must be an integer >= 1"]),
    "max_steps_zero": (None, ["--max-steps", "0"], ["step1.train.max_steps must be >= 1 (or -1 to use epochs), got 0"]),
    "bad_yaml": ("method: dual\n  model: [x\n", [], ["{config}: not valid YAML: mapping values are not allowed here"]),
    "yaml_not_a_mapping": ("- a\n- b\n", [], ["{config}: expected a mapping of config keys"]),
    "learning_rate_not_a_number": ("fit:\n  train:\n    learning_rate: fast\n", [], ["{config}: fit.train.learning_rate must be a number, got 'fast'"]),
    "unknown_method": (None, ["--set", "method=ppo"], ["method must be one of scit, dual; got 'ppo'"]),
    "negative_seed": (None, ["--seed", "-1"], ["seed must be in 0..4294967295, got -1"]),
    "save_steps_zero": (None, ["--set", "save_steps=0"], ["save_steps must be an integer >= 1, got 0"]),
    "lora_module_not_in_model": (None, ["--set", "fit.lora.target_modules=[attn]"], ["fit.lora.target_modules ['attn'] not found in", "q_proj"]),
    "logger_not_installed": (None, ["--set", "report_to=[wandb]"], ["report_to: 'wandb' is not installed"]),
    "unknown_logger": (None, ["--set", "report_to=[printer]"], ["report_to: unknown logger 'printer'"]),
    "config_file_missing": ("MISSING", [], ["config file {config} does not exist"]),
    "set_without_equals": (None, ["--set", "fit.lora.r"], ["--set expects key=value, got 'fit.lora.r'"]),
    "dropout_out_of_range": (None, ["--set", "fit.lora.dropout=1.5"], ["fit.lora.dropout must be in [0, 1), got 1.5"]),
    "batch_size_zero": (None, ["--set", "fit.train.batch_size=0"], ["fit.train.batch_size must be an integer >= 1, got 0"]),
    "identical_instructions": (None, ["--set", "preferred_instruction=Be good.", "--set", "dispreferred_instruction=Be good."], ["preferred_instruction and dispreferred_instruction must differ"]),
    "unknown_data_format": (None, ["--set", "data_format=csv"], ["data_format must be one of auto, hh, plain, conversational, ultrafeedback; got 'csv'"]),
}


def _materialise(case: Case, folder: Path) -> Path:
    path = folder / case.file
    if case.content == "dir":
        path.mkdir()
        (path / "rows.txt").write_text("not a dataset\n")
    elif callable(case.content):
        case.content(path)
    elif isinstance(case.content, bytes):
        path.write_bytes(case.content)
    return path


def _check_refused(code: int, err: str, expect: list[str]) -> str:
    assert code != 0
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("rahf: error: ")]
    assert len(lines) == 1, err
    for fragment in expect:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def test_corpus_has_at_least_thirty_cases():
    assert len(DATA_CASES) + len(CONFIG_CASES) >= 30
    assert len(DATA_CASES) >= 30


@pytest.mark.parametrize("name", list(DATA_CASES))
def test_bad_data_is_refused_in_one_line(name, tmp_path, assets, capsys):
    from rahf.cli import main

    model, _ = assets
    case = DATA_CASES[name]
    folder = tmp_path / "bad_inputs"
    folder.mkdir()
    path = _materialise(case, folder)
    if case.command == "inspect":
        argv = ["data", "inspect", str(path), "--model", str(model), *case.args]
    else:
        argv = ["align", "--dry-run", "--model", str(model), "--data", str(path), "--target-layers", "1,2",
                "--run-dir", str(tmp_path / "run"), *case.args]
    code = main(argv)
    _check_refused(code, capsys.readouterr().err, [f.format(path=path) for f in case.expect])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", list(CONFIG_CASES))
def test_bad_config_is_refused_in_one_line(name, tmp_path, assets, capsys):
    from rahf.cli import main

    model, data = assets
    yaml_text, flags, expect = CONFIG_CASES[name]
    config = tmp_path / "bad_inputs" / "config.yaml"
    config.parent.mkdir()
    argv = ["align", "--dry-run", "--model", str(model), "--data", str(data), "--run-dir", str(tmp_path / "run")]
    if yaml_text is not None:
        if yaml_text != "MISSING":
            config.write_text(yaml_text)
        argv += ["--config", str(config)]
    if "--target-layers" not in flags:
        argv += ["--target-layers", "1,2"]
    code = main([*argv, *flags])
    _check_refused(code, capsys.readouterr().err, [f.format(config=config) for f in expect])
    assert not (tmp_path / "run").exists()


def test_long_prompt_is_truncated_and_reported_not_refused(tmp_path, assets, capsys):
    """Longer than the window is normal data (HH has many): the oldest tokens are cut and the
    plan counts it; refusing it would reject real datasets."""
    from rahf.cli import main

    model, _ = assets
    data = tmp_path / "long.jsonl"
    data.write_bytes(jsonl({**GOOD, "prompt": "word " * 3000}, GOOD))
    code = main(["align", "--dry-run", "--json", "--model", str(model), "--data", str(data), "--target-layers", "1,2",
                 "--run-dir", str(tmp_path / "run"), "--set", "validation_fraction=0"])
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["tokens"]["truncated_prompts"] == 1


def test_debug_flag_lets_the_traceback_through(tmp_path, assets):
    from rahf.cli import main
    from rahf.data.schema import DataError

    model, _ = assets
    path = _materialise(DATA_CASES["non_utf8_jsonl"], tmp_path)
    with pytest.raises(DataError, match="is not UTF-8 text"):
        main(["--debug", "align", "--dry-run", "--model", str(model), "--data", str(path), "--target-layers", "1,2"])


@pytest.mark.parametrize("name", ["broken_json_line", "unknown_key_yaml"])
def test_fresh_interpreter_prints_exactly_one_line(name, tmp_path, assets):
    """The whole stderr of a real ``python -m rahf.cli`` is the one error line: no warnings,
    no traceback, nothing else."""
    model, data = assets
    folder = tmp_path / "bad_inputs"
    folder.mkdir()
    argv = ["align", "--dry-run", "--model", str(model), "--target-layers", "1,2", "--run-dir", str(tmp_path / "run")]
    if name in DATA_CASES:
        case = DATA_CASES[name]
        path = _materialise(case, folder)
        argv += ["--data", str(path)]
        expect = [f.format(path=path) for f in case.expect]
    else:
        yaml_text, _, fragments = CONFIG_CASES[name]
        config = folder / "config.yaml"
        config.write_text(yaml_text or "")
        argv += ["--data", str(data), "--config", str(config)]
        expect = [f.format(config=config) for f in fragments]
    result = run_subprocess(argv)
    assert result.returncode == 2
    line = _check_refused(result.returncode, result.stderr, expect)
    assert result.stderr.strip() == line
