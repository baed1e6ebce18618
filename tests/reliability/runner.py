"""Runners and helpers of the reliability suite (fixtures live in conftest.py).

Fault runs are real processes that really die. Most are *forked* from the test process, which
has already imported torch and transformers, so a run costs its work, not five seconds of
imports; a few are full ``python -m rahf.cli`` subprocesses to prove the real entry point.
Faults are placed with ``RAHF_FAULT`` (see ``rahf.faults``).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Small enough to run in seconds, large enough for several checkpoints per training stage.
RUN_SETTINGS = [
    "--target-layers", "1,2", "--device", "cpu", "--targets", "cached",
    "--set", "validation_fraction=0.2", "--set", "max_reply_tokens=16", "--set", "logging_steps=1",
    "--set", "step1.train.max_steps=4", "--set", "fit.train.max_steps=6", "--set", "save_steps=2",
    "--set", "step1.train.learning_rate=1e-2", "--set", "fit.train.learning_rate=1e-2",
]


@dataclass
class Result:
    returncode: int  # negative: killed by that signal
    stdout: str
    stderr: str

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("rahf: error")]


def write_pairs(path: Path, n: int = 16) -> Path:
    with open(path, "w") as handle:
        for i in range(n):
            row = {"prompt": f"What is {i} plus {i}?", "chosen": f"{i} plus {i} is {2 * i}.", "rejected": f"Maybe {i + 7}, who cares."}
            handle.write(json.dumps(row) + "\n")
    return path


def run_forked(argv: list[str], *, fault: str | None = None, timeout: float = 300) -> Result:
    """Run ``rahf <argv>`` in a forked child (a real process: SIGKILL really kills it)."""
    import torch  # noqa: F401 - imported before the fork, so the child starts warm

    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    out_path = logs / f"rahf-fork-{os.getpid()}-{time.monotonic_ns()}.out"
    err_path = out_path.with_suffix(".err")
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        gc.freeze()  # the inherited heap is never garbage: keep Trainer's gc.collect() calls cheap
        try:
            for fd, path in ((1, out_path), (2, err_path)):
                handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(handle, fd)
                os.close(handle)
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.environ.pop("RAHF_FAULT", None)
            if fault:
                os.environ["RAHF_FAULT"] = fault
            import torch

            torch.set_num_threads(1)
            from rahf.cli import main

            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:  # noqa: BLE001 - report, then leave without pytest's cleanup
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(f"rahf {' '.join(argv)} ran over {timeout} s")
        time.sleep(0.02)
    result = Result(os.waitstatus_to_exitcode(status), out_path.read_text(), err_path.read_text())
    out_path.unlink()
    err_path.unlink()
    return result


def run_subprocess(argv: list[str], *, fault: str | None = None, timeout: float = 300) -> Result:
    """Run ``python -m rahf.cli <argv>`` as a fresh interpreter."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RAHF_FAULT", None)
    if fault:
        env["RAHF_FAULT"] = fault
    proc = subprocess.run([sys.executable, "-m", "rahf.cli", *argv], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def free_port() -> int:
    """A TCP port nothing listens on now: a rendezvous port for a 2-rank launch."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def finish(proc: subprocess.Popen, timeout: float = 300) -> Result:
    """Wait for a process started with ``start_new_session=True``; on timeout kill its whole group
    (a launcher and its ranks: nothing left behind) and re-raise."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return Result(proc.returncode, stdout, stderr)


def copy_run(reference: Path, dest: Path) -> Path:
    """A copy of a finished run, to damage. Absolute paths inside it still name the reference's
    model and data, which is fine: the config records only settings."""
    shutil.copytree(reference, dest, symlinks=True)
    return dest


def adapter_difference(run_a: Path, run_b: Path) -> float:
    """Largest absolute difference between the final adapters' weights of two runs."""
    from safetensors.torch import load_file

    a = load_file(run_a / "final" / "adapter" / "adapter_model.safetensors")
    b = load_file(run_b / "final" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def assert_no_traceback(result: Result) -> None:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Corrupt one byte in place (size unchanged: only a checksum can notice)."""
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
