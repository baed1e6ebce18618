"""Targets computed once and cached on disk, for runs of more than one epoch.

Layout of a cache folder: ``targets.bin`` holds every example's (layers, reply_len, hidden)
target back to back as raw values, read through a memory map; ``index.json`` holds each
example's offset and reply length, the shape, the storage dtype and the sha256 of
``targets.bin`` so a truncated or corrupted file is detected instead of loaded.

Storage dtype (``fit.cache_dtype``): ``bfloat16`` (default) halves disk space and reads, at a
relative rounding error of about 2**-9 per value; ``float32`` stores the targets exactly as
computed. bf16 is written as its raw 16 bits (numpy has no bf16, so the memmap is uint16).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from rahf.io import atomic_write_json, file_digest

CacheDType = Literal["bfloat16", "float32"]
# dtype name -> (torch dtype of the values, numpy dtype of the raw memmap)
_STORAGE: dict[str, tuple[torch.dtype, type]] = {
    "bfloat16": (torch.bfloat16, np.uint16),
    "float32": (torch.float32, np.float32),
}


class CacheError(RuntimeError):
    """A cache file is missing, truncated or corrupted; the message names it."""


def write_cache(
    folder: Path,
    chunks: Iterable[tuple[list[int], torch.Tensor, torch.Tensor]],
    *,
    layers: int,
    hidden: int,
    dtype: CacheDType = "bfloat16",
) -> None:
    """Write targets from ``(example_indices, targets (L, B, R, H), reply_len (B,))`` chunks."""
    if dtype not in _STORAGE:
        raise ValueError(f"cache dtype must be one of {', '.join(_STORAGE)}, got {dtype!r}")
    torch_dtype, raw_dtype = _STORAGE[dtype]
    folder.mkdir(parents=True, exist_ok=True)
    tmp_bin = folder / ".targets.bin.tmp"
    entries: dict[int, tuple[int, int]] = {}
    offset = 0  # in elements
    with open(tmp_bin, "wb") as handle:
        for indices, targets, reply_len in chunks:
            for column, (index, length) in enumerate(zip(indices, reply_len.tolist(), strict=True)):
                block = targets[:, column, :length].to(torch_dtype).contiguous().cpu()
                raw = block.view(torch.uint16) if torch_dtype == torch.bfloat16 else block
                handle.write(raw.numpy().astype(raw_dtype, copy=False).tobytes())
                entries[index] = (offset, length)
                offset += block.numel()
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp_bin, folder / "targets.bin")
    atomic_write_json(
        folder / "index.json",
        {
            "layers": layers,
            "hidden": hidden,
            "dtype": dtype,
            "count": len(entries),
            "elements": offset,
            "sha256": file_digest(folder / "targets.bin"),
            "entries": {str(k): v for k, v in sorted(entries.items())},
        },
    )


class TargetCache:
    """Memory-mapped reader; ``cache[i]`` is example i's targets, (layers, reply_len, hidden).

    Reads caches of either storage dtype (an index without ``dtype`` is an older bf16 cache).
    """

    def __init__(self, folder: Path, *, verify: bool = True) -> None:
        index_path, bin_path = folder / "index.json", folder / "targets.bin"
        try:
            meta = json.loads(index_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CacheError(f"target cache index {index_path} is unreadable: {err}") from err
        self.dtype: CacheDType = meta.get("dtype", "bfloat16")
        if self.dtype not in _STORAGE:
            raise CacheError(f"target cache index {index_path} names an unknown dtype {self.dtype!r}")
        self._torch_dtype, raw_dtype = _STORAGE[self.dtype]
        expected = meta["elements"] * np.dtype(raw_dtype).itemsize
        actual = bin_path.stat().st_size if bin_path.exists() else -1
        if actual != expected:
            raise CacheError(f"target cache {bin_path} has {actual} bytes, expected {expected}: truncated or missing")
        if verify and file_digest(bin_path) != meta["sha256"]:
            raise CacheError(f"target cache {bin_path} fails its checksum: corrupted")
        self.layers, self.hidden = meta["layers"], meta["hidden"]
        self.entries = {int(k): tuple(v) for k, v in meta["entries"].items()}
        self.data = np.memmap(bin_path, dtype=raw_dtype, mode="r") if expected else np.zeros(0, raw_dtype)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> torch.Tensor:
        offset, length = self.entries[index]
        size = self.layers * length * self.hidden
        raw = torch.from_numpy(np.array(self.data[offset : offset + size]))
        values = raw.view(torch.bfloat16) if self._torch_dtype == torch.bfloat16 else raw
        return values.reshape(self.layers, length, self.hidden)

    def batch(self, indices: list[int], width: int) -> torch.Tensor:
        """(layers, batch, width, hidden) float32, zero past each reply."""
        out = torch.zeros(self.layers, len(indices), width, self.hidden)
        for column, index in enumerate(indices):
            t = self[index]
            out[:, column, : t.shape[1]] = t.float()
        return out
