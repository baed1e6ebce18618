"""One run folder, one writer (``rahf.runlock``): refused, taken over, released, raced.

The first half drives the lock directly from forked processes (milliseconds each); the second
runs real ``rahf align`` / ``rahf baseline`` processes against one folder.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rahf.runlock import (
    LOCK_NAME,
    Holder,
    RunLock,
    RunLocked,
    clear_folder,
    holder_alive,
    read_holder,
    run_lock,
)
from reliability.runner import ROOT, adapter_difference, assert_no_traceback, run_forked


def in_child(work, *, hold: float = 0.0) -> int:
    """Fork; the child runs ``work()`` (which writes its own report), stays alive ``hold``
    seconds, exits 0 (3 if ``work`` raised); returns its pid."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            work()
        except BaseException:  # noqa: BLE001 - the parent checks what was written
            code = 3
        finally:
            time.sleep(hold)
            os._exit(code)
    return pid


def wait(pid: int, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise TimeoutError(f"child {pid} ran over {timeout} s")


def take_and_report(folder: Path, report: Path):
    def work() -> None:
        try:
            RunLock(folder).acquire()  # never released: the child holds it until it exits
            report.write_text("ok")
        except RunLocked as err:
            report.write_text(f"refused: {err}")
    return work


def test_lock_names_its_holder_and_refuses_a_second_process_in_one_line(tmp_path):
    folder = tmp_path / "run"
    with RunLock(folder, command="rahf align --run-dir run") as lock:
        holder = read_holder(folder / LOCK_NAME)
        assert holder is not None and holder.pid == os.getpid() and holder.host == socket.gethostname()
        assert holder.command == "rahf align --run-dir run" and abs(holder.started - time.time()) < 60
        assert holder_alive(holder) is True
        assert lock.held == holder
        report = tmp_path / "child.out"
        assert wait(in_child(take_and_report(folder, report))) == 0
        message = report.read_text()
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.started))
        assert message == (
            f"refused: {folder} is in use by another rahf process (pid {os.getpid()} on this host,"
            f" started {started}: rahf align --run-dir run): wait for it to finish or stop it"
            f" (kill {os.getpid()}; a stopped run resumes when rerun), or use another --run-dir"
        )
        assert "\n" not in message
        assert read_holder(folder / LOCK_NAME) == holder  # the refused process changed nothing
    assert not (folder / LOCK_NAME).exists()  # released
    assert sorted(p.name for p in folder.iterdir()) == []  # no temporaries either


def test_lock_of_a_sigkilled_holder_is_taken_over_with_a_notice(tmp_path, capsys):
    folder = tmp_path / "run"

    def take_then_die() -> None:
        RunLock(folder).acquire()
        os.kill(os.getpid(), signal.SIGKILL)

    dead = in_child(take_then_die)
    assert wait(dead) == -signal.SIGKILL
    stale = read_holder(folder / LOCK_NAME)
    assert stale is not None and stale.pid == dead and holder_alive(stale) is False
    with RunLock(folder):
        assert read_holder(folder / LOCK_NAME).pid == os.getpid()
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"rahf: taking over {folder / LOCK_NAME}: its holder is no longer running ({stale.describe()})"]


def write_lock(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": "rahf align",
              "proc_start": None, "boot_id": None, "token": "t", **fields}
    (folder / LOCK_NAME).write_text(json.dumps(record))
    return folder / LOCK_NAME


def proc_start(pid: int) -> int:
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text[text.rindex(")") + 2 :].split()[19])


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to tell a reused pid apart")
def test_reused_pid_is_not_mistaken_for_the_holder(tmp_path, capsys):
    """A live process whose start time differs from the one recorded took the pid over later."""
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        real = proc_start(sleeper.pid)
        lock = write_lock(tmp_path / "reused", pid=sleeper.pid, proc_start=real - 1)
        assert holder_alive(read_holder(lock)) is False
        with RunLock(tmp_path / "reused"):
            assert read_holder(lock).pid == os.getpid()
        assert "its holder is no longer running" in capsys.readouterr().out

        lock = write_lock(tmp_path / "same", pid=sleeper.pid, proc_start=real)
        with pytest.raises(RunLocked, match=f"in use by another rahf process \\(pid {sleeper.pid} on this host"):
            RunLock(tmp_path / "same").acquire()
        assert read_holder(lock).pid == sleeper.pid  # left alone
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to see a zombie")
def test_zombie_holder_counts_as_gone(tmp_path):
    child = in_child(lambda: None)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}/stat").read_text().split(")")[-1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        lock = write_lock(tmp_path / "run", pid=child, proc_start=proc_start(child))
        assert holder_alive(read_holder(lock)) is False
        with RunLock(tmp_path / "run"):
            pass
    finally:
        os.waitpid(child, 0)


def test_holder_on_another_host_is_refused_with_how_to_clear_it(tmp_path):
    lock = write_lock(tmp_path / "run", host="gpu-node-7", pid=12345)
    assert holder_alive(read_holder(lock)) is None
    with pytest.raises(RunLocked) as err:
        RunLock(tmp_path / "run", option="--out").acquire()
    assert str(err.value).endswith(f"if it is no longer running, delete {lock} and rerun; otherwise use another --out")
    assert "pid 12345 on host gpu-node-7" in str(err.value)
    assert lock.exists()


def test_unreadable_lock_is_taken_over(tmp_path, capsys):
    lock = write_lock(tmp_path / "run")
    lock.write_text("{not json")
    with RunLock(tmp_path / "run"):
        assert read_holder(lock).pid == os.getpid()
    assert f"rahf: {lock} is unreadable" in capsys.readouterr().out


@pytest.mark.parametrize("stale", [False, True], ids=["fresh_folder", "stale_lock"])
def test_racing_processes_exactly_one_wins(tmp_path, stale):
    """Eight processes try at the same instant, on a fresh folder or one with a dead holder's
    lock: exactly one gets it (atomic creation; takeover under flock)."""
    folder = tmp_path / "run"
    if stale:
        dead = in_child(lambda: None)
        wait(dead)
        write_lock(folder, pid=dead)
    start = time.time() + 0.3
    reports = [tmp_path / f"r{i}.out" for i in range(8)]

    def contender(report: Path):
        def work() -> None:
            while time.time() < start:
                time.sleep(0.001)
            take_and_report(folder, report)()
        return work

    pids = [in_child(contender(r), hold=1.0) for r in reports]  # winners stay alive: not stale
    assert all(wait(p) == 0 for p in pids)
    results = [r.read_text() for r in reports]
    assert results.count("ok") == 1, results
    assert all(r == "ok" or r.startswith(f"refused: {folder} is in use by another rahf process") for r in results)


def test_released_on_exception_but_never_by_a_forked_child(tmp_path):
    folder = tmp_path / "run"
    with pytest.raises(ValueError), run_lock(folder):
        raise ValueError("boom")
    assert not (folder / LOCK_NAME).exists()

    with run_lock(folder) as lock:
        child = in_child(lock.release)  # a fork inherits the object, not the ownership
        assert wait(child) == 0
        assert read_holder(folder / LOCK_NAME).pid == os.getpid()
    assert not (folder / LOCK_NAME).exists()


def test_overwrite_clears_the_folder_but_keeps_the_lock(tmp_path):
    folder = tmp_path / "run"
    (folder / "fit" / "checkpoints").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "link").symlink_to(tmp_path)
    with RunLock(folder):
        clear_folder(folder)
        assert [p.name for p in folder.iterdir()] == [LOCK_NAME]
    assert tmp_path.is_dir()  # the symlink went, not what it pointed to


def test_distributed_ranks_all_hear_a_refusal_and_none_hangs(tmp_path):
    """Two gloo ranks: rank 0 is refused (the folder is held by this test), so rank 1, which
    waits for rank 0's outcome, raises the same error instead of waiting in a barrier."""
    folder, init = tmp_path / "run", tmp_path / "pg"
    reports = [tmp_path / f"rank{r}.out" for r in range(2)]

    def rank(r: int):
        def work() -> None:
            import torch.distributed as dist

            os.environ.update(RANK=str(r), WORLD_SIZE="2")
            dist.init_process_group("gloo", init_method=f"file://{init}", rank=r, world_size=2)
            try:
                for attempt in ("held", "free"):
                    try:
                        with run_lock(folder):
                            holder = read_holder(folder / LOCK_NAME)
                            result = f"ok {holder.pid}"
                            dist.barrier()  # both have read it before rank 0 releases it
                    except RunLocked as err:
                        result = f"refused: {err}"
                    with open(reports[r], "a") as handle:
                        handle.write(f"{attempt} {result}\n")
                    dist.barrier()
                    if attempt == "held" and r == 0:
                        os.kill(os.getppid(), signal.SIGUSR1)  # the test lets go of the folder
                        time.sleep(0.5)
                    dist.barrier()
            finally:
                dist.destroy_process_group()
        return work

    released = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: released.append(1))
    try:
        holder = RunLock(folder).acquire()
        pids = [in_child(rank(r)) for r in range(2)]
        deadline = time.monotonic() + 60
        while not released and time.monotonic() < deadline:
            time.sleep(0.01)
        holder.release()
        codes = [wait(p, timeout=60) for p in pids]
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert codes == [0, 0]
    lines = [r.read_text().splitlines() for r in reports]
    refusal = f"held refused: {folder} is in use by another rahf process (pid {os.getpid()} on this host"
    assert lines[0][0].startswith(refusal) and lines[1][0] == lines[0][0]
    rank0 = pids[0]
    assert lines[0][1] == lines[1][1] == f"free ok {rank0}"  # only rank 0 took it; both saw it held


# ---------------------------------------------------------------- real rahf processes


def test_concurrent_align_one_runs_the_others_exit_2_in_one_line(tmp_path, align_argv, reference):
    """A runs; while it holds the folder, a second ``rahf align``, one with ``--overwrite`` and a
    ``rahf baseline`` on the same folder are refused. A then ends with the adapter of a solo run."""
    import rahf.baselines.sft  # noqa: F401 - imported before the forks, so the refused runs start warm
    import rahf.pipeline  # noqa: F401

    run_dir = tmp_path / "run"
    first: list = []
    thread = threading.Thread(target=lambda: first.append(run_forked(align_argv(run_dir))))
    thread.start()
    deadline = time.monotonic() + 120
    while not (run_dir / "config.json").exists():  # A holds the lock and has started writing
        assert thread.is_alive() and time.monotonic() < deadline, first
        time.sleep(0.005)
    holder = read_holder(run_dir / LOCK_NAME)
    os.kill(holder.pid, signal.SIGSTOP)  # keep A mid-run while the others try
    try:
        before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
        model, data = align_argv(run_dir)[2], align_argv(run_dir)[4]
        attempts = {
            "align": align_argv(run_dir),
            "align --overwrite": align_argv(run_dir, "--overwrite"),
            "baseline": ["baseline", "sft", "--model", model, "--data", data, "--run-dir", str(run_dir), "--device", "cpu"],
        }
        for name, argv in attempts.items():
            refused = run_forked(argv)
            assert refused.returncode == 2, (name, refused.stderr[-2000:])
            assert_no_traceback(refused)
            lines = refused.stderr.strip().splitlines()
            assert len(lines) == 1, (name, lines)
            assert lines[0].startswith(f"rahf: error: {run_dir} is in use by another rahf process (pid {holder.pid} on this host"), lines
            assert lines[0].endswith(f"(kill {holder.pid}; a stopped run resumes when rerun), or use another --run-dir")
            assert refused.stdout == "", (name, refused.stdout)
        assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before  # nothing touched
    finally:
        os.kill(holder.pid, signal.SIGCONT)
        thread.join(timeout=300)
    assert first[0].returncode == 0, first[0].stderr[-3000:]
    assert adapter_difference(run_dir, reference) <= 1e-6
    assert not (run_dir / LOCK_NAME).exists()


def test_sigkilled_run_leaves_a_stale_lock_the_next_run_takes_over_and_resumes(tmp_path, align_argv, reference):
    run_dir = tmp_path / "run"
    killed = run_forked(align_argv(run_dir), fault="kill@step:fit:5")
    assert killed.returncode == -signal.SIGKILL
    stale = read_holder(run_dir / LOCK_NAME)
    assert stale is not None and holder_alive(stale) is False

    rerun = run_forked(align_argv(run_dir))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"rahf: taking over {run_dir / LOCK_NAME}: its holder is no longer running ({stale.describe()})" in rerun.stdout
    assert f"resuming from {run_dir}/fit/checkpoints/checkpoint-4" in rerun.stdout
    assert adapter_difference(run_dir, reference) <= 1e-6
    assert not (run_dir / LOCK_NAME).exists()


def test_sigterm_and_errors_release_the_lock(tmp_path, align_argv):
    stopped = run_forked(align_argv(tmp_path / "term"), fault="term@stage:step1_dispreferred")
    assert stopped.returncode == 143
    assert not (tmp_path / "term" / LOCK_NAME).exists()
    failed = run_forked(align_argv(tmp_path / "nan"), fault="nan@loss:step1_preferred:2")
    assert failed.returncode == 1
    assert not (tmp_path / "nan" / LOCK_NAME).exists()


def test_holder_dataclass_round_trips(tmp_path):
    lock = write_lock(tmp_path / "run", pid=7, proc_start=11, boot_id="b")
    assert read_holder(lock) == Holder(pid=7, host=socket.gethostname(), started=read_holder(lock).started,
                                       command="rahf align", proc_start=11, boot_id="b", token="t")


def test_benchmark_cache_folder_is_locked_too(tmp_path, monkeypatch):
    """bench/quality.py and bench/sensitivity.py fill their cache under ``benchlib.cache_lock``."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    monkeypatch.setattr(sys, "argv", ["bench/quality.py"])
    from benchlib import cache_lock

    cache, report = tmp_path / "cache", tmp_path / "child.out"

    def second() -> None:
        try:
            with cache_lock(cache):
                report.write_text("ok")
        except SystemExit as stop:
            report.write_text(str(stop.code))

    with cache_lock(cache):
        assert read_holder(cache / LOCK_NAME).pid == os.getpid()
        assert wait(in_child(second)) == 0
    assert report.read_text().startswith(f"bench/quality.py: {cache} is in use by another rahf process (pid {os.getpid()}")
    assert report.read_text().endswith("or use another --out")
    assert not (cache / LOCK_NAME).exists()


@pytest.mark.parametrize("record", ['{"pid": "12", "host": "h", "started": 1, "command": "c"}', '{"pid": 0, "host": "h", "started": 1, "command": "c"}', "[1, 2]", ""])
def test_malformed_lock_records_count_as_unreadable(tmp_path, record):
    lock = write_lock(tmp_path / "run")
    lock.write_text(record)
    assert read_holder(lock) is None
