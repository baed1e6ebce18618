"""SIGKILL at every kind of point, then the same command again: same adapter as a clean run.

A kill leaves whatever was on disk at that instant; the rerun must skip finished stages, resume
training from the newest *complete* checkpoint, and end with weights equal (to 1e-6) to an
uninterrupted run's: same data order, same RNG state, same LoRA initialisation.
"""

from __future__ import annotations

import signal

import pytest

from reliability.runner import adapter_difference, assert_no_traceback, run_forked

KILL_POINTS = {
    # name: (fault point, what the rerun must say)
    "during_step1": ("step:step1_preferred:3", "resuming from {run}/step1_preferred/checkpoints/checkpoint-2"),
    "between_stages": ("stage:step1_dispreferred", "skipping step1_preferred"),
    "mid_fitting": ("step:fit:5", "resuming from {run}/fit/checkpoints/checkpoint-4"),
    "while_saving_checkpoint": ("save:fit:4", "not resuming from {run}/fit/checkpoints/checkpoint-4: it has no rahf_checkpoint.json"),
    "after_target_cache_before_marker": ("done:targets", "stage fit"),
    "after_last_step_before_marker": ("done:fit", "holds the last step of this stage; loading it"),
    "while_writing_final_adapter": ("write:final/adapter", "skipping fit"),
}


@pytest.mark.parametrize("name", list(KILL_POINTS))
def test_sigkill_then_rerun_gives_the_same_adapter(name, tmp_path, align_argv, reference):
    point, expected = KILL_POINTS[name]
    from rahf.trainer import checkpoint_problem

    run_dir = tmp_path / "run"
    killed = run_forked(align_argv(run_dir), fault=f"kill@{point}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    if name == "while_saving_checkpoint":
        partial = run_dir / "fit" / "checkpoints" / "checkpoint-4"
        assert (partial / "adapter_model.safetensors").is_file() and not (partial / "trainer_state.json").exists()
    assert not (run_dir / "final" / "DONE.json").exists()

    rerun = run_forked(align_argv(run_dir))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_no_traceback(rerun)
    assert expected.format(run=run_dir) in rerun.stdout, rerun.stdout
    assert adapter_difference(run_dir, reference) <= 1e-6
    if name == "while_saving_checkpoint":
        # The cut-off checkpoint-4 (weights only) was removed, the run resumed from checkpoint-2,
        # and the checkpoints saved since carry valid completion markers.
        assert f"resuming from {run_dir}/fit/checkpoints/checkpoint-2 (newest complete checkpoint; 1 newer one(s) removed)" in rerun.stdout
        for step in (4, 6):
            assert checkpoint_problem(run_dir / "fit" / "checkpoints" / f"checkpoint-{step}") is None
    # Nothing half-written survives: no temporaries anywhere in the run folder.
    assert not [p for p in run_dir.rglob(".*tmp*")], list(run_dir.rglob(".*tmp*"))
