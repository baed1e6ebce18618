"""Atomic writes and completion markers: a stage's outputs appear whole or not at all.

Every temporary file or folder these helpers create is named ``.<name>.<random>.tmp`` (or
``.<name>.tmp``) next to its destination, so a process killed mid-write leaves only names that
:func:`is_temp_name` recognises: manifests skip them and :func:`remove_stale_temps` sweeps them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rahf.faults import fault_point

HASH_LIMIT = 1 << 30  # files above 1 GiB are checked by size only: hashing tens of GB per save costs minutes


_UMASK = os.umask(0)
os.umask(_UMASK)


def is_main_process() -> bool:
    """In a distributed run (torchrun / accelerate launch) only rank 0 writes files."""
    return int(os.environ.get("RANK", "0")) == 0


def join_process_group() -> None:
    """Under torchrun / accelerate launch, join the process group so stages can wait for each other."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState()


def leave_process_group() -> None:
    """Destroy the process group before exit: a gloo group left to interpreter shutdown can abort
    the process ("terminate called without an active exception") after an error on every rank."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wait_for_everyone() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def is_temp_name(name: str) -> bool:
    """Names of the temporaries this module creates (and ``write_cache`` / plots imitate)."""
    return name.startswith(".") and ".tmp" in name


def remove_stale_temps(folder: str | Path) -> None:
    """Remove temporaries a killed process left directly inside ``folder``."""
    folder = Path(folder)
    if not folder.is_dir() or not is_main_process():
        return
    for item in folder.iterdir():
        if is_temp_name(item.name):
            shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)


def check_writable_dir(path: str | Path) -> None:
    """Raise the OSError writing under ``path`` would raise, before any work is done.

    Walks up to the nearest existing ancestor: it must be a folder this process may write to.
    (Root passes every permission check, so runs as root learn of read-only mounts only on write.)
    """
    path = Path(path).absolute()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"cannot create {path}: {probe} is a file, not a folder", str(probe))
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, f"cannot write to {probe}", str(probe))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    if not is_main_process():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs are ordinary files
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_dir(final: str | Path, build: Callable[[Path], None]) -> Path:
    """Build a folder in a temporary sibling, then rename it into place.

    An interrupted build leaves only a ``.tmp`` sibling, which the next call removes.
    """
    final = Path(final)
    if not is_main_process():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        build(tmp)
        fault_point(f"write:{final.parent.name}/{final.name}", final)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(final.parent)
    return final


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_manifest(folder: str | Path, *, hash_limit: int | None = None) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file under a folder (relative paths); markers and temporaries
    are left out. Files larger than ``hash_limit`` bytes get no sha256 (checked by size only)."""
    folder = Path(folder)
    manifest: dict[str, dict[str, Any]] = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name == "DONE.json" or any(is_temp_name(part) for part in p.relative_to(folder).parts):
            continue
        size = p.stat().st_size
        entry: dict[str, Any] = {"size": size}
        if hash_limit is None or size <= hash_limit:
            entry["sha256"] = file_digest(p)
        manifest[str(p.relative_to(folder))] = entry
    return manifest


def manifest_problem(folder: str | Path, files: Any) -> str | None:
    """What is wrong with ``folder`` compared with a manifest it recorded, or None if nothing.

    The answer names the file: a marker that lists a missing, truncated or changed file must
    never be trusted, and the user needs to know which file it was.
    """
    folder = Path(folder)
    if not isinstance(files, Mapping):
        return f"the file list in {folder}'s marker is unreadable"
    for rel, meta in files.items():
        path = folder / rel
        if not isinstance(meta, Mapping) or not isinstance(meta.get("size"), int):
            return f"the marker entry for {path} is unreadable"
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != meta["size"]:
            return f"{path} has {size} bytes, expected {meta['size']} (truncated or overwritten)"
        if meta.get("sha256") and file_digest(path) != meta["sha256"]:
            return f"{path} fails its sha256 checksum (corrupted)"
    return None


def read_marker(path: str | Path) -> dict[str, Any] | None:
    """A JSON marker as a dict, or None if it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):  # ValueError covers bad JSON and bad UTF-8
        return None
    return data if isinstance(data, dict) else None
