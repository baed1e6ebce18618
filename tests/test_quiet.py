"""Readable runs: no warnings from rahf's own calls, one progress bar per stage with the loss on
it instead of printed log dicts, ``--quiet`` (results and errors only) and ``--verbose``."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

from rahf import console
from rahf.testing import save_tiny, write_toy_pairs

SRC = str(Path(__file__).resolve().parents[1] / "src" / "rahf")
BAR = re.compile(r"\d+%\|")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("quiet")
    return save_tiny(root / "tiny", layers=3), write_toy_pairs(root / "pairs.jsonl", 12)


def align(tiny, run_dir, *flags: str) -> int:
    from rahf.cli import main

    model, data = tiny
    return main([
        *flags, "align", "--model", str(model), "--data", str(data), "--run-dir", str(run_dir),
        "--max-steps", "2", "--target-layers", "1,2", "--device", "cpu",
        "--set", "logging_steps=1", "--set", "max_reply_tokens=8", "--set", "validation_fraction=0.2",
    ])


def test_align_warns_nothing_from_rahf_calls_and_draws_a_bar_per_stage(tiny, tmp_path, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # pyproject's filterwarnings would hide FutureWarnings
        assert align(tiny, tmp_path / "run") == 0
    out, err = capsys.readouterr()
    ours = [
        f"{w.category.__name__}: {w.message} ({w.filename})" for w in caught
        if w.filename.startswith(SRC)
        or "is_gradient_checkpointing" in str(w.message)  # peft's read of it, on each model it wraps
        or any(re.search(m, str(w.message)) for m, _, _ in console.KNOWN_LIBRARY_DEPRECATIONS)
    ]
    assert ours == []
    assert "Warning" not in out + err
    # One bar per training stage, named after it, with the loss on it; no raw log dicts.
    for stage in ("step1 (preferred)", "step1 (dispreferred)", "fit"):
        assert re.search(rf"{re.escape(stage)}: 100%\|.*loss=\d", err), stage
    assert "{'loss'" not in out + err and "'grad_norm'" not in out + err
    assert "rahf: stage fit ..." in out
    bars = {seg.split(":")[0] for seg in re.split(r"[\r\n]", err) if BAR.search(seg)}
    assert bars == {"step1 (preferred)", "step1 (dispreferred)", "fit"}  # no others (weight loading ...)


def test_quiet_prints_results_only_and_restores_library_state(tiny, tmp_path, capsys):
    import transformers.utils.logging as tf_logging

    before = (tf_logging.is_progress_bar_enabled(), tf_logging.get_verbosity(), console.level())
    assert align(tiny, tmp_path / "run", "--quiet") == 0
    out, err = capsys.readouterr()
    assert not BAR.search(err) and "step/s" not in err
    assert "rahf: stage" not in out and "done in" not in out
    assert f"rahf: aligned model in {tmp_path / 'run' / 'final'}" in out
    assert (tf_logging.is_progress_bar_enabled(), tf_logging.get_verbosity(), console.level()) == before


def test_quiet_and_verbose_exclude_each_other(capsys):
    from rahf.cli import main

    with pytest.raises(SystemExit):
        main(["--quiet", "--verbose", "config"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_verbose_writes_each_logged_step_as_a_line(capsys):
    from transformers import TrainerControl, TrainerState

    from rahf.trainer import StageProgress

    state, control = TrainerState(max_steps=4, global_step=0), TrainerControl()
    console.set_level("verbose")
    try:
        progress = StageProgress("fit")
        progress.on_train_begin(None, state, control)
        state.global_step = 2
        progress.on_step_end(None, state, control)
        progress.on_log(None, state, control, logs={"loss": 0.123456, "learning_rate": 1e-4})
        progress.on_train_end(None, state, control)
    finally:
        console.set_level("normal")
    err = capsys.readouterr().err
    assert "fit step 2/4  loss 0.1235  learning_rate 0.0001" in err
    assert re.search(r"fit:\s+50%\|.*loss=0\.1235", err)
    # Fewer steps than logging_steps: the stage's mean loss from the Trainer's last log.
    progress = StageProgress("dpo")
    progress.on_train_begin(None, state, control)
    progress.on_log(None, state, control, logs={"train_runtime": 1.0, "train_loss": 0.5})
    progress.on_train_end(None, state, control)
    err = capsys.readouterr().err
    assert "mean_loss=0.5" in err and "train_runtime" not in err
    with pytest.raises(ValueError, match="quiet, normal, verbose"):
        console.set_level("loud")
