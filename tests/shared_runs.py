"""One tiny align run shared by the test files of issue 13 (halves, readiness, convergence).

Test modules import the fixtures (``from shared_runs import aligned_run_fixture``); the
module-level cache makes the run happen once per session. Its
settings exercise the defaults that matter there (prompt-disjoint halves, readiness) and the
fit capacity knob (all-linear LoRA of rank 16, still restricted to blocks 0..max(L)-1).
"""

from __future__ import annotations

from pathlib import Path

import pytest

_CACHE: dict[str, tuple[Path, Path, Path]] = {}


def tiny_settings(model: Path, data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"model={model}", f"data={data}", f"run_dir={run_dir}", "validation_fraction=0.2",
        "patterns.target_layers=[1,2]", "step1.train.max_steps=4", "fit.train.max_steps=6",
        "step1.train.learning_rate=1e-2", "fit.train.learning_rate=1e-2", "logging_steps=1",
        "max_reply_tokens=16", "device=cpu", *extra,
    ]


@pytest.fixture(scope="session", name="tiny_assets")
def tiny_assets_fixture(tmp_path_factory) -> tuple[Path, Path]:
    from rahf.testing import save_tiny, write_toy_pairs

    if "assets" not in _CACHE:
        root = tmp_path_factory.mktemp("issue13")
        _CACHE["assets"] = (save_tiny(root / "tiny", layers=4), write_toy_pairs(root / "pairs.jsonl", 24), root)
    model, data, _ = _CACHE["assets"]
    return model, data


@pytest.fixture(scope="session", name="aligned_run")
def aligned_run_fixture(tiny_assets) -> Path:
    """RUN_DIR of a finished Dual run with the default share, all-linear fit LoRA r=16."""
    from rahf.config import load_config
    from rahf.pipeline import align

    if "run" not in _CACHE:
        model, data = tiny_assets
        run_dir = _CACHE["assets"][2] / "run"
        align(load_config(None, tiny_settings(model, data, run_dir, "fit.lora.target_modules=[all-linear]",
                                               "fit.lora.r=16", "fit.convergence_examples=4")))
        _CACHE["run"] = (run_dir, run_dir, run_dir)
    return _CACHE["run"][0]
