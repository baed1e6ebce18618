"""One run folder, one writer: a lock file that a crash cannot leave in the way.

``rahf align``, ``rahf baseline`` and the benchmarks' cache folders take ``<folder>/rahf.lock``
before they write anything there. The lock names its holder (pid, host, start time, command). A
second process on the same folder is refused with :class:`RunLocked` (the CLI prints one line,
exit 2). A lock whose holder is gone (same host, and its pid no longer runs the process that
took it) was left by a killed run: the next run takes it over with a one-line notice and resumes.

* Creation is atomic: the record is written to a temporary sibling, then hard-linked to
  ``rahf.lock`` (``link`` fails if the name exists), so no reader ever sees a half-written lock.
  Where hard links are not supported, ``O_CREAT | O_EXCL`` does the same job.
* Taking over a stale lock happens under ``flock`` on the folder itself, so two runs that both
  find the same dead holder cannot both win. The kernel drops that ``flock`` if its holder dies.
* A reused pid is not mistaken for the holder: the lock records the holder's start time in
  clock ticks since boot (``/proc/<pid>/stat``, field 22) and the boot id, and both must match.
* Under ``torchrun`` / ``accelerate launch`` only rank 0 takes the lock; every other rank waits
  for its outcome (a broadcast), so a refused rank 0 never leaves the others in a barrier.
* The lock is released when the block ends, by a return, an exception or SIGTERM (which the CLI
  raises like Ctrl-C). Only SIGKILL (or a power cut) leaves a stale lock, for the next run.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

LOCK_NAME = "rahf.lock"

try:
    import fcntl
except ImportError:  # Windows: no flock; creation is still atomic, takeover races are not guarded
    fcntl = None  # type: ignore[assignment]


class RunLocked(RuntimeError):
    """Another live process holds the folder; the message names it and how to proceed."""


@dataclass(frozen=True)
class Holder:
    """What a lock file records about the process that took it."""

    pid: int
    host: str
    started: float  # time.time() when the lock was taken
    command: str
    proc_start: int | None = None  # /proc/<pid>/stat starttime (clock ticks since boot)
    boot_id: str | None = None
    token: str = ""  # tells this lock apart from a later one by the same pid

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        where = "this host" if self.host == socket.gethostname() else f"host {self.host}"
        command = self.command if len(self.command) <= 160 else self.command[:157] + "..."
        return f"pid {self.pid} on {where}, started {started}: {command}"


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """``(state, starttime)`` of ``pid`` from ``/proc``, or None if there is no such process.

    The command name (field 2) may hold spaces and parentheses: fields are counted after its
    last ``)``. Raises OSError when ``/proc`` itself is missing (not Linux).
    """
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if not Path("/proc/self/stat").exists():
            raise
        return None
    except ProcessLookupError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])  # fields 3 and 22 of proc(5)


def _me(command: str | None) -> Holder:
    try:
        stat = _proc_stat(os.getpid())
    except (OSError, ValueError, IndexError):
        stat = None
    return Holder(
        pid=os.getpid(),
        host=socket.gethostname(),
        started=time.time(),
        command=command or shlex.join(["rahf", *sys.argv[1:]] if sys.argv[0].endswith(("rahf", "cli.py")) else sys.argv),
        proc_start=stat[1] if stat else None,
        boot_id=_boot_id(),
        token=secrets.token_hex(8),
    )


def holder_alive(holder: Holder) -> bool | None:
    """Whether the process that took the lock still runs: True, False, or None (another host:
    this one cannot tell). A zombie, or a pid now running another process, counts as gone."""
    if holder.host != socket.gethostname():
        return None
    if holder.boot_id and _boot_id() and holder.boot_id != _boot_id():
        return False  # the machine rebooted since: every process of that boot is gone
    try:
        stat = _proc_stat(holder.pid)
    except (OSError, ValueError, IndexError):  # no /proc: ask the kernel whether the pid exists
        try:
            os.kill(holder.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    if stat is None or stat[0] in ("Z", "X"):
        return False
    return holder.proc_start is None or stat[1] == holder.proc_start


def read_holder(path: str | Path) -> Holder | None:
    """The holder a lock file names, or None if it is missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text())
        holder = Holder(**{k: data[k] for k in Holder.__dataclass_fields__ if k in data})
    except (OSError, ValueError, TypeError, KeyError):
        return None
    fields_ok = (
        isinstance(holder.pid, int) and holder.pid > 0 and isinstance(holder.host, str)
        and isinstance(holder.started, (int, float)) and isinstance(holder.command, str)
        and isinstance(holder.proc_start, (int, type(None)))
    )
    return holder if fields_ok else None


@contextlib.contextmanager
def _folder_guard(folder: Path) -> Iterator[None]:
    """``flock`` on the folder, held for the few microseconds of a check-and-take."""
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(folder, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without flock: creation stays atomic regardless
            if fd is not None:
                os.close(fd)
            fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing drops the flock


class RunLock:
    """The lock of one folder, for this process. ``option`` names the flag that picks another
    folder, for the refusal message (``--run-dir``, ``--out``)."""

    def __init__(self, folder: str | Path, *, option: str = "--run-dir", command: str | None = None) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.option = option
        self.command = command
        self.held: Holder | None = None

    def acquire(self) -> RunLock:
        """Take the lock, taking over one a dead process left; raise :class:`RunLocked` if a
        live process holds it. Creates the folder (the same checks as any run-folder write)."""
        from rahf.io import check_writable_dir

        check_writable_dir(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        me = _me(self.command)
        with _folder_guard(self.folder):
            for _ in range(3):
                if self._create(me):
                    self.held = me
                    return self
                holder = read_holder(self.path)
                if holder is None:
                    print(f"rahf: {self.path} is unreadable (left by a run that died while taking it); taking it over")
                else:
                    alive = holder_alive(holder)
                    if alive is not False:
                        raise RunLocked(self._refusal(holder, alive))
                    print(f"rahf: taking over {self.path}: its holder is no longer running ({holder.describe()})")
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
        raise RunLocked(f"{self.path} keeps reappearing: another process is taking it; retry, or use another {self.option}")

    def _refusal(self, holder: Holder, alive: bool | None) -> str:
        who = "this process" if holder.pid == os.getpid() and alive else "another rahf process"
        how = (
            f"wait for it to finish or stop it (kill {holder.pid}; a stopped run resumes when rerun), or use another {self.option}"
            if alive
            else f"if it is no longer running, delete {self.path} and rerun; otherwise use another {self.option}"
        )
        return f"{self.folder} is in use by {who} ({holder.describe()}): {how}"

    def _create(self, me: Holder) -> bool:
        """Create the lock file whole, atomically; False if it already exists."""
        data = (json.dumps(asdict(me), indent=2) + "\n").encode()
        tmp = self.folder / f".{LOCK_NAME}.{me.token}.tmp"
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as err:  # no hard links here (some network / FUSE file systems)
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
                raise
            return self._create_exclusive(data)
        finally:
            tmp.unlink(missing_ok=True)

    def _create_exclusive(self, data: bytes) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def release(self) -> None:
        """Remove the lock if this process still holds it (a forked child never removes it)."""
        held, self.held = self.held, None
        if held is None or held.pid != os.getpid():
            return
        current = read_holder(self.path)
        if current is not None and current.token == held.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _share_from_main(error: BaseException | None) -> BaseException | None:
    """Rank 0's outcome, on every rank of a distributed run (itself when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return error
    box = [error]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def run_lock(folder: str | Path, *, option: str = "--run-dir", command: str | None = None) -> Iterator[RunLock]:
    """Hold ``folder``'s lock for the block: rank 0 takes it, the other ranks wait for the
    outcome and raise the same error if it was refused."""
    from rahf.io import is_main_process

    lock = RunLock(folder, option=option, command=command)
    error: BaseException | None = None
    if is_main_process():
        try:
            lock.acquire()
        except Exception as err:  # noqa: BLE001 - every rank must hear of it, then raise it
            error = err
    error = _share_from_main(error)
    if error is not None:
        raise error
    try:
        yield lock
    finally:
        lock.release()


def clear_folder(folder: str | Path) -> None:
    """Delete everything in ``folder`` except its lock (``--overwrite`` under the lock)."""
    import shutil

    folder = Path(folder)
    if not folder.is_dir():
        return
    for item in folder.iterdir():
        if item.name == LOCK_NAME:
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item)
        else:
            item.unlink()
