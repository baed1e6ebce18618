"""An FSDP launch where accelerate will not shard (CPU ranks) is refused, not run as DDP.

accelerate 1.15 drops ``ACCELERATE_USE_FSDP=true`` on CPU processes (``MULTI_CPU``) without a
word; these tests set the variable as ``accelerate launch --config_file fsdp.yaml`` does, in one
process (the multi-process launch is tests/reliability/test_scale_out.py).
"""

from __future__ import annotations

import pytest
from shared_runs import tiny_assets_fixture  # noqa: F401  (fixture)

from rahf.config import ConfigError, TrainSettings


@pytest.fixture
def fsdp_env(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")


@pytest.mark.parametrize("kind", ["MULTI_CPU", "NO", None])
def test_fsdp_requested_without_an_fsdp_capable_state_is_refused(fsdp_env, kind):
    from rahf.trainer import refuse_unsharded_fsdp

    with pytest.raises(ConfigError, match=r"FSDP was requested .* configs/accelerate/ddp\.yaml .* GPUs"):
        refuse_unsharded_fsdp(kind)


@pytest.mark.parametrize("kind", ["MULTI_GPU", "MULTI_XPU", "FSDP"])
def test_fsdp_on_accelerators_is_allowed(fsdp_env, kind):
    from accelerate.utils import DistributedType

    from rahf.trainer import refuse_unsharded_fsdp

    refuse_unsharded_fsdp(DistributedType(kind))  # accelerate turns these into FSDP: no error


def test_no_fsdp_request_runs_anywhere(monkeypatch):
    from rahf.trainer import refuse_unsharded_fsdp, trainer_arguments

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    refuse_unsharded_fsdp("MULTI_CPU")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    refuse_unsharded_fsdp("MULTI_CPU")
    assert trainer_arguments(TrainSettings(), "unused", seed=0, bf16=False, use_cpu=True, logging_steps=1).use_cpu


def test_trainer_arguments_refuse_fsdp_on_cpu(fsdp_env, tmp_path):
    """Every Trainer (RAHF stages, TRL baselines) gets its arguments here: the one place to stop."""
    from rahf.trainer import trainer_arguments

    with pytest.raises(ConfigError, match="nothing would be sharded"):
        trainer_arguments(TrainSettings(), tmp_path, seed=0, bf16=False, use_cpu=True, logging_steps=1)


def test_align_dry_run_refuses_fsdp_on_cpu_in_one_line(fsdp_env, tiny_assets, tmp_path, capsys):
    from rahf.cli import main

    model, data = tiny_assets
    code = main(["align", "--model", str(model), "--data", str(data), "--run-dir", str(tmp_path / "run"),
                 "--device", "cpu", "--target-layers", "1,2", "--dry-run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("rahf: error: FSDP was requested"), err
    assert "configs/accelerate/ddp.yaml" in err[0]
