"""Kill and resume under a real 2-process (gloo DDP) run: the same adapter as an uninterrupted one.

Opt-in (``-m multiprocess``): each launch starts two fresh interpreters, so these tests take
minutes, not seconds (RELIABILITY.md gives the command and the measured time).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -m multiprocess tests/reliability/test_multiprocess_resume.py

The launcher is ``accelerate launch --multi_gpu --num_processes 2`` on a machine without CUDA:
torchrun starts two ranks that train on CPU over gloo. (``accelerate launch --cpu
--num_processes 2`` starts ONE process in accelerate 1.x: multi-CPU there means mpirun with
``--mpirun_hostfile``.) One test starts the two ranks itself, as torchrun would (``RANK``,
``WORLD_SIZE``, ``MASTER_PORT`` ...), to see each rank's exit status.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rahf.runlock import LOCK_NAME, RunLock, holder_alive, read_holder
from reliability.runner import (
    ROOT,
    Result,
    adapter_difference,
    assert_no_traceback,
    finish,
    free_port,
)

pytestmark = pytest.mark.multiprocess


def _env(fault: str | None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAHF_FAULT", None)
    if fault:
        env["RAHF_FAULT"] = fault
    return env


def start_launcher(argv: list[str], *, fault: str | None = None) -> subprocess.Popen:
    """``accelerate launch --multi_gpu --num_processes 2 -m rahf.cli <argv>`` in its own session."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), "-m", "rahf.cli", *argv,
    ]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(fault), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def launch(argv: list[str], *, fault: str | None = None, timeout: float = 300) -> Result:
    return finish(start_launcher(argv, fault=fault), timeout)


@pytest.fixture(scope="module")
def reference2(tmp_path_factory, align_argv) -> Path:
    """An uninterrupted 2-process run: the adapter every interrupted one must end with."""
    run_dir = tmp_path_factory.mktemp("reference2") / "run"
    result = launch(align_argv(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("rahf: stage fit ...") == 2  # both ranks trained
    return run_dir


KILL_POINTS = {
    "during_step1": ("step:step1_preferred:3", "resuming from {run}/step1_preferred/checkpoints/checkpoint-2"),
    "mid_fitting": ("step:fit:5", "resuming from {run}/fit/checkpoints/checkpoint-4"),
}


@pytest.mark.parametrize("name", list(KILL_POINTS))
def test_sigkill_then_relaunch_gives_the_same_adapter(name, tmp_path, align_argv, reference2):
    """Both ranks SIGKILLed after the same step (as a node loss or the OOM killer would); the
    launcher reports the failure; the same launch again takes over the stale lock and resumes."""
    point, expected = KILL_POINTS[name]
    run_dir = tmp_path / "run"
    killed = launch(align_argv(run_dir), fault=f"kill@{point}")
    assert killed.returncode != 0
    assert "SIGKILL" in killed.stderr, killed.stderr[-3000:]  # torchrun names the signal that killed the ranks
    stale = read_holder(run_dir / LOCK_NAME)
    assert stale is not None and holder_alive(stale) is False  # rank 0 took it, and died holding it
    assert not (run_dir / "final" / "DONE.json").exists()

    rerun = launch(align_argv(run_dir))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.count(f"rahf: taking over {run_dir / LOCK_NAME}: its holder is no longer running") == 1
    assert rerun.stdout.count(expected.format(run=run_dir)) == 2, rerun.stdout  # each rank resumed there
    assert adapter_difference(run_dir, reference2) <= 1e-6
    assert not (run_dir / LOCK_NAME).exists()
    assert not [p for p in run_dir.rglob(".*tmp*")], list(run_dir.rglob(".*tmp*"))


def start_ranks(argv: list[str], *, faults: dict[int, str] | None = None) -> list[subprocess.Popen]:
    """Two ``python -m rahf.cli`` ranks wired as torchrun wires them; ``faults``: rank -> fault."""
    port, procs = free_port(), []
    for rank in range(2):
        env = {**_env((faults or {}).get(rank)), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "rahf.cli", *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True,
        ))
    return procs


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step_exits_143_and_resumes(tmp_path, align_argv, reference2):
    """SIGTERM reaches rank 0 only, after fit step 3 (a launcher's forwarded signals arrive a
    moment apart; here the other never comes): the ranks agree at the step end, both save
    checkpoint-3 and exit 143 with the resume note, and the relaunch resumes there, mid-epoch
    (each fit epoch is 2 steps on 2 ranks), to the same adapter."""
    from rahf.trainer import checkpoint_problem

    run_dir = tmp_path / "run"
    results = [finish(p, timeout=180) for p in start_ranks(align_argv(run_dir), faults={0: "term@step:fit:3"})]
    checkpoint = run_dir / "fit" / "checkpoints" / "checkpoint-3"
    note = f"rahf: fit: stopped by SIGTERM after step 3; checkpoint saved in {checkpoint}. Rerun the same command to resume from it"
    assert [r.returncode for r in results] == [143, 143], [r.stderr[-2000:] for r in results]
    for result in results:
        assert_no_traceback(result)
        assert result.stderr.strip().splitlines()[-1] == note
    assert checkpoint_problem(checkpoint) is None
    assert not (run_dir / LOCK_NAME).exists()  # released on the way out

    rerun = launch(align_argv(run_dir))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.count(f"resuming from {checkpoint}") == 2
    assert adapter_difference(run_dir, reference2) <= 1e-6


def test_sigterm_to_the_launcher_checkpoints_and_the_relaunch_resumes(tmp_path, align_argv, reference2):
    """SIGTERM to ``accelerate launch`` itself, mid-fit: it forwards SIGTERM to both ranks, which
    save a checkpoint and stop; rank 0 prints the resume note. (The launcher then exits 1 with
    torch's own SignalException traceback: that part is torchrun's, not rahf's.)"""
    from rahf.trainer import checkpoint_problem

    run_dir = tmp_path / "run"
    proc = start_launcher(align_argv(run_dir))
    marker = run_dir / "fit" / "checkpoints" / "checkpoint-2" / "rahf_checkpoint.json"
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    stopped = finish(proc)
    assert stopped.returncode != 0
    lines = [line for line in stopped.stderr.splitlines() if line.startswith("rahf: fit: stopped by SIGTERM after step ")]
    assert len(lines) == 2, stopped.stderr[-3000:]  # each rank; both stopped after the same step
    assert lines[0] == lines[1]
    step = int(lines[0].split("after step ")[1].split(";")[0])
    checkpoint = run_dir / "fit" / "checkpoints" / f"checkpoint-{step}"
    assert lines[0].endswith(f"checkpoint saved in {checkpoint}. Rerun the same command to resume from it")
    assert checkpoint_problem(checkpoint) is None
    assert not (run_dir / LOCK_NAME).exists()

    rerun = launch(align_argv(run_dir))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from {checkpoint}" in rerun.stdout or f"{checkpoint} holds the last step" in rerun.stdout
    assert adapter_difference(run_dir, reference2) <= 1e-6


def test_a_held_folder_refuses_every_rank_without_hanging(tmp_path, align_argv):
    """Rank 0 is refused; rank 1, waiting for rank 0's outcome, exits with it (no barrier hang)."""
    run_dir = tmp_path / "run"
    with RunLock(run_dir):
        results = [finish(p, timeout=180) for p in start_ranks(align_argv(run_dir))]
        assert read_holder(run_dir / LOCK_NAME).pid == os.getpid()
    for result in results:
        assert result.returncode == 2, result.stderr[-2000:]
        assert_no_traceback(result)
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith(f"rahf: error: {run_dir} is in use by another rahf process (pid {os.getpid()}"), lines
    assert sorted(p.name for p in run_dir.iterdir()) == []  # nothing written
