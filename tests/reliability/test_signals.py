"""SIGTERM and Ctrl-C (SIGINT): stop at a step boundary, save a checkpoint, say how to resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from reliability.runner import ROOT, adapter_difference, assert_no_traceback, run_forked


def test_sigterm_saves_checkpoint_exits_143_and_resumes_exactly(tmp_path, align_argv, reference):
    from rahf.trainer import checkpoint_problem

    run_dir = tmp_path / "run"
    stopped = run_forked(align_argv(run_dir), fault="term@step:fit:3")
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert_no_traceback(stopped)
    last = stopped.stderr.strip().splitlines()[-1]
    checkpoint = run_dir / "fit" / "checkpoints" / "checkpoint-3"  # step 3 is not a save step: saved for the stop
    assert last == (
        f"rahf: fit: stopped by SIGTERM after step 3; checkpoint saved in {checkpoint}."
        " Rerun the same command to resume from it"
    )
    assert checkpoint_problem(checkpoint) is None
    assert not (run_dir / "fit" / "DONE.json").exists()

    rerun = run_forked(align_argv(run_dir))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from {checkpoint}" in rerun.stdout
    assert adapter_difference(run_dir, reference) <= 1e-6


def test_sigterm_outside_training_exits_143_with_resume_note(tmp_path, align_argv):
    """Between stages there is no step to finish: the run stops at once, cleanly."""
    run_dir = tmp_path / "run"
    stopped = run_forked(align_argv(run_dir), fault="term@stage:fit")
    assert stopped.returncode == 143
    assert_no_traceback(stopped)
    assert stopped.stderr.strip().splitlines()[-1] == (
        "rahf: interrupted by SIGTERM; finished stages and checkpoints are kept: rerun the same command to resume"
    )
    assert (run_dir / "step1_dispreferred" / "DONE.json").is_file()


def test_ctrl_c_from_outside_stops_at_step_end_with_checkpoint(tmp_path, align_argv):
    """A real SIGINT sent by another process to a fresh interpreter, mid-training."""
    from rahf.trainer import checkpoint_problem

    run_dir = tmp_path / "run"
    argv = align_argv(run_dir, "--set", "step1.train.max_steps=400")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RAHF_FAULT", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "rahf.cli", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    checkpoints = run_dir / "step1_preferred" / "checkpoints"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (checkpoints / "checkpoint-2" / "rahf_checkpoint.json").exists():
        time.sleep(0.02)  # training is under way once its first checkpoint is complete
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("rahf: step1 (preferred): stopped by SIGINT after step "), last
    assert last.endswith("Rerun the same command to resume from it")
    step = int(last.split("after step ")[1].split(";")[0])
    assert 2 <= step < 400
    assert checkpoint_problem(checkpoints / f"checkpoint-{step}") is None
