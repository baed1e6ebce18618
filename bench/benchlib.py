"""What every benchmark shares: the machine's name, its own section of BENCHMARKS.md, and a
lock on its cache folder."""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write_section(name: str, text: str, path: Path = BENCHMARKS) -> None:
    """Replace only the ``<!-- name:start -->`` ... ``<!-- name:end -->`` part of BENCHMARKS.md.

    Each benchmark owns one section, so running one never touches the others' numbers.
    """
    from rahf.io import atomic_write_text

    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = f"{start}\n{text.strip()}\n{end}"
    if not path.exists():
        atomic_write_text(path, section + "\n")
        return
    current = path.read_text()
    if start in current and end in current:
        head, rest = current.split(start, 1)
        atomic_write_text(path, head + section + rest.split(end, 1)[1])
    else:
        atomic_write_text(path, current.rstrip("\n") + "\n\n" + section + "\n")


@contextlib.contextmanager
def cache_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder/rahf.lock`` while a benchmark fills its cache folder (``rahf.runlock``):
    two runs of one benchmark on one cache would train into the same run folders. A second one
    stops with a line naming the first (exit 1); a lock left by a killed run is taken over."""
    import sys

    from rahf.runlock import RunLock, RunLocked

    lock = RunLock(folder, option="--out")
    try:
        lock.acquire()
    except RunLocked as err:
        raise SystemExit(f"bench/{Path(sys.argv[0]).name}: {err}") from None
    try:
        yield
    finally:
        lock.release()
