"""Fixtures of the reliability suite: a tiny model, data, the align command, a reference run."""

from __future__ import annotations

from pathlib import Path

import pytest

from reliability.runner import RUN_SETTINGS, run_subprocess, write_pairs


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> tuple[Path, Path]:
    """(tiny model folder, pairs file)."""
    from rahf.testing import save_tiny

    root = tmp_path_factory.mktemp("reliability")
    return save_tiny(root / "tiny", layers=2, hidden=32), write_pairs(root / "pairs.jsonl")


@pytest.fixture(scope="session")
def align_argv(assets):
    model, data = assets

    def argv(run_dir: Path, *extra: str) -> list[str]:
        return ["align", "--model", str(model), "--data", str(data), "--run-dir", str(run_dir), *RUN_SETTINGS, *extra]

    return argv


@pytest.fixture(scope="session")
def reference(tmp_path_factory, align_argv) -> Path:
    """An uninterrupted run of the same command, as a fresh interpreter: the adapter to match."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = run_subprocess(align_argv(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir
