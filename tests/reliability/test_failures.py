"""Runs that cannot go on: NaN loss, a full disk, an output folder that cannot be written.

Each must stop with one line that says what happened and where, exit non-zero, print no
traceback, and leave every earlier output intact so the same command resumes once fixed.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from reliability.runner import adapter_difference, assert_no_traceback, run_forked, run_subprocess


def test_nan_loss_cli_stops_with_step_one_line_and_keeps_checkpoint(tmp_path, align_argv):
    """A real interpreter: the whole stderr ends in exactly one error line, no traceback."""
    from rahf.trainer import checkpoint_problem

    run_dir = tmp_path / "run"
    result = run_subprocess(align_argv(run_dir), fault="nan@loss:fit:5")
    assert result.returncode == 1, result.stderr[-3000:]
    assert_no_traceback(result)
    checkpoint = run_dir / "fit" / "checkpoints" / "checkpoint-4"
    assert result.error_lines() == [
        f"rahf: error: fit: loss became nan at step 5; last good checkpoint: {checkpoint}"
        " (a lower learning rate usually helps; a changed config needs a new --run-dir or --overwrite)"
    ]
    assert result.stderr.strip().splitlines()[-1] == result.error_lines()[0]
    assert checkpoint_problem(checkpoint) is None
    assert not (run_dir / "fit" / "DONE.json").exists() and not (run_dir / "final").exists()


def test_debug_flag_shows_the_traceback(tmp_path, align_argv):
    result = run_forked(["--debug", *align_argv(tmp_path / "run")], fault="nan@loss:step1_preferred:1")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "TrainingError" in result.stderr


def _intact(run_dir: Path, stages: list[str]) -> None:
    from rahf.runs import RunDir

    run = RunDir(run_dir)
    for stage in stages:
        assert run.is_done(stage), stage
        run.finished.append(stage)


@pytest.mark.parametrize(
    ("point", "path"),
    [
        ("save:fit:4", "{run}/fit/checkpoints/checkpoint-4"),  # Trainer writing a checkpoint
        ("write:final/merged", "{run}/final/merged"),  # an atomic folder of the export
        ("done:step1_dispreferred", "{run}/step1_dispreferred/DONE.json"),  # a stage marker
    ],
)
def test_disk_full_gives_one_line_keeps_earlier_outputs_and_resumes(point, path, tmp_path, align_argv, reference):
    run_dir = tmp_path / "run"
    full = run_forked(align_argv(run_dir), fault=f"enospc@{point}")
    assert full.returncode == 1, full.stderr[-3000:]
    assert_no_traceback(full)
    assert full.error_lines() == [
        f"rahf: error: No space left on device ({path.format(run=run_dir)}); free some space, then rerun"
        " the same command: finished stages and checkpoints are kept"
    ]
    finished = {"save:fit:4": ["data", "step1_preferred", "step1_dispreferred"],
                "write:final/merged": ["data", "step1_preferred", "step1_dispreferred", "fit"],
                "done:step1_dispreferred": ["data", "step1_preferred"]}[point]
    _intact(run_dir, finished)
    assert not list(run_dir.rglob(".*tmp*")), "a temporary survived the failed write"
    rerun = run_forked(align_argv(run_dir))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert adapter_difference(run_dir, reference) <= 1e-6


def test_torch_save_disk_full_error_becomes_enospc(tmp_path, monkeypatch):
    """torch.save reports a full disk as an opaque RuntimeError; it is translated."""
    import shutil
    from types import SimpleNamespace

    from rahf.trainer import train_resumably

    class FakeTrainer:
        args = SimpleNamespace(output_dir=str(tmp_path / "checkpoints"), seed=0)

        def add_callback(self, callback) -> None:
            pass

        def remove_callback(self, callback) -> None:
            pass

        def train(self, resume_from_checkpoint=None) -> None:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=1, used=1, free=0))
    with pytest.raises(OSError) as caught:
        train_resumably(FakeTrainer())
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "checkpoints")


def test_run_dir_under_a_file_is_refused_before_work(tmp_path, align_argv, capsys):
    from rahf.cli import main

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(align_argv(blocker / "run")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"rahf: error: cannot create {blocker / 'run'}: {blocker} is a file, not a folder;"
        " a path component is a file, not a folder: choose another --run-dir"
    )
    assert blocker.read_text() == "not a folder"


def test_run_dir_without_write_permission_is_refused_before_work(tmp_path, align_argv, capsys, monkeypatch):
    """Tests run as root, whom chmod does not stop: the permission check is simulated."""
    import rahf.io
    from rahf.cli import main

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(rahf.io.os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    assert main(align_argv(locked / "run")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"rahf: error: cannot write to {locked}; no permission to write there: choose another --run-dir"
    )
    assert list(locked.iterdir()) == []


def test_atomic_writes_under_enospc_leave_old_content_and_no_temporaries(tmp_path, monkeypatch):
    """The write itself fails (monkeypatched fsync raising ENOSPC): the old file and folder stay."""
    import rahf.io
    from rahf.io import atomic_dir, atomic_write_json

    target = tmp_path / "DONE.json"
    atomic_write_json(target, {"old": True})
    folder = tmp_path / "adapter"
    atomic_dir(folder, lambda tmp: (tmp / "weights.bin").write_bytes(b"old"))

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rahf.io.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_json(target, {"new": True})

    def build(tmp: Path) -> None:
        (tmp / "weights.bin").write_bytes(b"new, half")
        full(0)

    with pytest.raises(OSError, match="No space left"):
        atomic_dir(folder, build)
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"old": True}
    assert (folder / "weights.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["DONE.json", "adapter"]
