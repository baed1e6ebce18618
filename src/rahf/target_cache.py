"""Targets computed once and cached on disk, for runs of more than one epoch.

Layout of a cache folder: ``targets.bin`` holds every example's (layers, reply_len, hidden)
target back to back as raw bf16 (stored as uint16; numpy has no bf16), read through a memory
map; ``index.json`` holds each example's offset and reply length, the shape, and the sha256 of
``targets.bin`` so a truncated or corrupted file is detected instead of loaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from rahf.io import atomic_write_json, file_digest


class CacheError(RuntimeError):
    """A cache file is missing, truncated or corrupted; the message names it."""


def write_cache(folder: Path, chunks: Iterable[tuple[list[int], torch.Tensor, torch.Tensor]], *, layers: int, hidden: int) -> None:
    """Write targets from ``(example_indices, targets (L, B, R, H), reply_len (B,))`` chunks."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp_bin = folder / ".targets.bin.tmp"
    entries: dict[int, tuple[int, int]] = {}
    offset = 0
    with open(tmp_bin, "wb") as handle:
        for indices, targets, reply_len in chunks:
            for column, (index, length) in enumerate(zip(indices, reply_len.tolist(), strict=True)):
                block = targets[:, column, :length].to(torch.bfloat16).contiguous().cpu()
                handle.write(block.view(torch.uint16).numpy().tobytes())
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
            "count": len(entries),
            "elements": offset,
            "sha256": file_digest(folder / "targets.bin"),
            "entries": {str(k): v for k, v in sorted(entries.items())},
        },
    )


class TargetCache:
    """Memory-mapped reader; ``cache[i]`` is example i's targets, (layers, reply_len, hidden)."""

    def __init__(self, folder: Path, *, verify: bool = True) -> None:
        index_path, bin_path = folder / "index.json", folder / "targets.bin"
        try:
            meta = json.loads(index_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CacheError(f"target cache index {index_path} is unreadable: {err}") from err
        expected = meta["elements"] * 2
        actual = bin_path.stat().st_size if bin_path.exists() else -1
        if actual != expected:
            raise CacheError(f"target cache {bin_path} has {actual} bytes, expected {expected}: truncated or missing")
        if verify and file_digest(bin_path) != meta["sha256"]:
            raise CacheError(f"target cache {bin_path} fails its checksum: corrupted")
        self.layers, self.hidden = meta["layers"], meta["hidden"]
        self.entries = {int(k): tuple(v) for k, v in meta["entries"].items()}
        self.data = np.memmap(bin_path, dtype=np.uint16, mode="r") if expected else np.zeros(0, np.uint16)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> torch.Tensor:
        offset, length = self.entries[index]
        size = self.layers * length * self.hidden
        raw = torch.from_numpy(np.array(self.data[offset : offset + size]))
        return raw.view(torch.bfloat16).reshape(self.layers, length, self.hidden)

    def batch(self, indices: list[int], width: int) -> torch.Tensor:
        """(layers, batch, width, hidden) float32, zero past each reply."""
        out = torch.zeros(self.layers, len(indices), width, self.hidden)
        for column, index in enumerate(indices):
            t = self[index]
            out[:, column, : t.shape[1]] = t.float()
        return out
