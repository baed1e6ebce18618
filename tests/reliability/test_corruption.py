"""Damaged files in a run folder: detected by size or sha256, reported by path, never loaded.

Each test copies the finished reference run, damages one file, reruns the same command and
checks the message, what was redone, and that the final adapter still equals the reference.
"""

from __future__ import annotations

import shutil

import pytest

from reliability.runner import (
    adapter_difference,
    assert_no_traceback,
    copy_run,
    flip_byte,
    run_forked,
    truncate,
)


def _rerun(align_argv, run_dir):
    result = run_forked(align_argv(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_no_traceback(result)
    return result


def test_corrupted_stage_output_redoes_that_stage_only(tmp_path, align_argv, reference):
    run_dir = copy_run(reference, tmp_path / "run")
    damaged = run_dir / "step1_preferred" / "adapter" / "adapter_model.safetensors"
    flip_byte(damaged)
    out = _rerun(align_argv, run_dir).stdout
    assert f"rahf: {damaged} fails its sha256 checksum (corrupted); redoing stage step1_preferred" in out
    assert f"resuming from {run_dir}/step1_preferred/checkpoints/checkpoint-4" in out
    # The redone stage reproduced its outputs exactly, so nothing built on them is redone.
    for later in ("step1_dispreferred", "fit", "final"):
        assert f"skipping {later}" in out
    assert adapter_difference(run_dir, reference) <= 1e-6


def test_truncated_stage_marker_redoes_the_stage(tmp_path, align_argv, reference):
    run_dir = copy_run(reference, tmp_path / "run")
    marker = run_dir / "fit" / "DONE.json"
    truncate(marker)
    out = _rerun(align_argv, run_dir).stdout
    assert f"rahf: {marker} is unreadable; redoing stage fit" in out
    assert f"resuming from {run_dir}/fit/checkpoints/checkpoint-6" in out
    assert adapter_difference(run_dir, reference) <= 1e-6


@pytest.mark.parametrize(
    ("damage", "file", "message"),
    [
        (truncate, "optimizer.pt", "{path} has {size} bytes, expected {expected} (truncated or overwritten)"),
        (flip_byte, "adapter_model.safetensors", "{path} fails its sha256 checksum (corrupted)"),
        (truncate, "rahf_checkpoint.json", "its marker rahf_checkpoint.json is unreadable"),
        (lambda path: path.unlink(), "trainer_state.json", "{path} is missing"),
    ],
    ids=["truncated_optimizer", "corrupted_weights", "truncated_marker", "missing_state"],
)
def test_damaged_checkpoint_falls_back_to_the_previous_good_one(damage, file, message, tmp_path, align_argv, reference):
    run_dir = copy_run(reference, tmp_path / "run")
    (run_dir / "fit" / "DONE.json").unlink()  # as if killed after the last checkpoint
    shutil.rmtree(run_dir / "final")
    newest = run_dir / "fit" / "checkpoints" / "checkpoint-6"
    path = newest / file
    expected = path.stat().st_size
    damage(path)
    size = path.stat().st_size if path.exists() else 0
    out = _rerun(align_argv, run_dir).stdout
    reason = message.format(path=path, size=size, expected=expected)
    assert f"rahf: not resuming from {newest}: {reason}" in out
    assert f"resuming from {run_dir}/fit/checkpoints/checkpoint-4 (newest complete checkpoint; 1 newer one(s) removed)" in out
    assert adapter_difference(run_dir, reference) <= 1e-6


@pytest.mark.parametrize("damage", [flip_byte, truncate], ids=["corrupted", "truncated"])
def test_damaged_target_cache_is_recomputed(damage, tmp_path, align_argv, reference):
    run_dir = copy_run(reference, tmp_path / "run")
    shutil.rmtree(run_dir / "fit")  # the cache is read only while fitting
    shutil.rmtree(run_dir / "final")
    cache = run_dir / "targets" / "targets.bin"
    expected = cache.stat().st_size
    damage(cache)
    out = _rerun(align_argv, run_dir).stdout
    problem = (
        f"{cache} fails its sha256 checksum (corrupted)" if damage is flip_byte
        else f"{cache} has {expected // 2} bytes, expected {expected} (truncated or overwritten)"
    )
    assert f"rahf: {problem}; redoing stage targets" in out
    assert adapter_difference(run_dir, reference) <= 1e-6


def test_changed_earlier_output_redoes_later_stages_from_scratch(tmp_path, align_argv, reference):
    """A stage whose inputs changed since it finished is not reused (its checkpoints neither)."""
    from safetensors.torch import load_file, save_file

    from rahf.runs import RunDir

    run_dir = copy_run(reference, tmp_path / "run")
    weights = run_dir / "step1_preferred" / "adapter" / "adapter_model.safetensors"
    save_file({k: v * 2 for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    run = RunDir(run_dir)
    run.finished = ["data"]
    run.mark_done("step1_preferred", {"result": {}})  # a valid marker for the new weights
    out = _rerun(align_argv, run_dir).stdout
    assert "skipping step1_preferred" in out
    for later in ("step1_dispreferred", "fit"):
        assert f"rahf: the outputs stage {later} was built from have changed since it finished; redoing it from scratch" in out
    assert "resuming from" not in out
    assert adapter_difference(run_dir, reference) > 1e-3


def test_unreadable_run_config_is_refused(tmp_path, align_argv, reference, capsys):
    from rahf.cli import main

    run_dir = copy_run(reference, tmp_path / "run")
    truncate(run_dir / "config.json")
    assert main(align_argv(run_dir)) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"rahf: error: {run_dir / 'config.json'} is unreadable, so this run's configuration cannot be compared:"
        " restore it, use another --run-dir, or --overwrite to start again"
    )
