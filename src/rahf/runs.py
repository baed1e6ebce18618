"""The run engine: a run folder of stages, each finished by a verified marker, and pair I/O.

Used by ``rahf align`` (:mod:`rahf.pipeline`) and the baselines (:mod:`rahf.baselines`). Each stage
writes into ``RUN_DIR/<stage>/`` and finishes by writing ``DONE.json`` (sizes and checksums of its
files, and a digest of the earlier stages' outputs it was built from). Rerunning the same command
skips finished stages, redoes a stage whose files or inputs changed, resumes an interrupted
training stage from its newest complete checkpoint (:mod:`rahf.trainer`), and refuses to mix runs
of different configurations in one folder. RELIABILITY.md lists the faults this survives.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from rahf import console
from rahf.config import AlignConfig, ConfigError
from rahf.data import PreferencePair, load_preferences, split_pairs
from rahf.data.schema import DataError
from rahf.faults import fault_point
from rahf.io import (
    atomic_write_json,
    atomic_write_text,
    check_writable_dir,
    folder_manifest,
    is_main_process,
    manifest_problem,
    read_marker,
    remove_stale_temps,
    wait_for_everyone,
)

# Settings that do not change results; a rerun may change them freely. Gradient checkpointing
# recomputes the same activations (tests/test_memory_budget.py): the weights do not change.
_COSMETIC = {"report_to", "logging_steps", "run_dir", "device", "gradient_checkpointing", "memory_budget_gb"}


class RunDir:
    """A run folder: one sub-folder per stage, each finished by a verified ``DONE.json``.

    ``finished`` lists the stages this invocation found done or completed, in pipeline order; a
    stage's marker records a digest of their files (logs aside), so a stage built from outputs
    that have since changed is redone from scratch (``stale``) instead of silently reused.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.finished: list[str] = []
        self.stale: set[str] = set()

    def stage(self, name: str) -> Path:
        """The folder of stage ``name``."""
        return self.root / name

    def _upstream(self, name: str) -> str:
        """Digest of the outputs of the stages finished before ``name`` (logs do not count:
        a resumed run logs averages over different windows)."""
        summary = {}
        for stage in self.finished:
            if stage != name:
                files = (read_marker(self.stage(stage) / "DONE.json") or {}).get("files", {})
                summary[stage] = {k: v for k, v in files.items() if k != "log.json"}
        return hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()

    def is_done(self, name: str) -> bool:
        marker_path = self.stage(name) / "DONE.json"
        if not marker_path.exists():
            return False
        marker = read_marker(marker_path)
        problem = f"{marker_path} is unreadable" if marker is None else manifest_problem(self.stage(name), marker.get("files"))
        if problem:
            print(f"rahf: {problem}; redoing stage {name}")
            return False
        if "upstream" in marker and marker["upstream"] != self._upstream(name):
            print(f"rahf: the outputs stage {name} was built from have changed since it finished; redoing it from scratch")
            self.stale.add(name)
            return False
        return True

    def mark_done(self, name: str, extra: dict | None = None) -> None:
        files = folder_manifest(self.stage(name))
        files = {k: v for k, v in files.items() if not k.startswith("checkpoints/")}
        fault_point(f"done:{name}", self.stage(name) / "DONE.json")
        atomic_write_json(
            self.stage(name) / "DONE.json",
            {"stage": name, "finished": time.time(), "files": files, "upstream": self._upstream(name), **(extra or {})},
        )

    def check_config(self, config: AlignConfig, *, overwrite: bool) -> None:
        """Save the config; a rerun must use the same one (cosmetic fields aside)."""
        path = self.root / "config.json"
        current = {k: v for k, v in asdict(config).items() if k not in _COSMETIC}
        if path.exists() and not overwrite:
            saved = read_marker(path)
            if saved is None:
                raise ConfigError(
                    f"{path} is unreadable, so this run's configuration cannot be compared:"
                    " restore it, use another --run-dir, or --overwrite to start again"
                )
            saved = config.upgrade_saved(saved)  # a folder an older rahf wrote, in today's keys
            changed = sorted(k for k in set(saved) | set(current) if k not in _COSMETIC and saved.get(k) != current.get(k))
            if changed:
                raise ConfigError(
                    f"{self.root} holds a run with a different configuration ({', '.join(changed)} differ):"
                    " use another --run-dir, or --overwrite to start again"
                )
        check_writable_dir(self.root)
        if overwrite and self.root.exists() and is_main_process():
            from rahf.runlock import clear_folder

            clear_folder(self.root)  # everything but the lock this run holds (rahf.runlock)
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, current)
        config.save(self.root / "config.yaml")


def run_stage(
    run: RunDir,
    name: str,
    work: Callable[[Path], dict | None],
    *,
    log: dict[str, list],
    main_only: bool = False,
    seed: int | None = None,
) -> dict:
    """Run ``work(stage_dir)`` unless the stage is done; keep its training log for export.

    Training stages run on every process of a distributed run (only rank 0 writes files);
    ``main_only`` stages run on rank 0 while the others wait. ``seed`` reseeds every RNG before
    the work, so a stage run in a resumed process initialises (e.g. its LoRA) exactly as in an
    uninterrupted one, whatever earlier stages drew.
    """
    folder = run.stage(name)
    log_path = folder / "log.json"
    wait_for_everyone()
    if run.is_done(name):
        console.info(f"rahf: skipping {name} (already done in {folder})")
        log[name] = json.loads(log_path.read_text()) if log_path.is_file() else []
        run.finished.append(name)
        return (read_marker(folder / "DONE.json") or {}).get("result", {})
    fault_point(f"stage:{name}")
    if name in run.stale and is_main_process():
        shutil.rmtree(folder, ignore_errors=True)  # its checkpoints came from the old inputs
    wait_for_everyone()
    console.info(f"rahf: stage {name} ...")
    start = time.time()
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder)
    if seed is not None:
        from transformers import set_seed

        set_seed(seed)
    with console.library_deprecations_ignored():  # see rahf.console.KNOWN_LIBRARY_DEPRECATIONS
        result = (work(folder) if is_main_process() or not main_only else None) or {}
    wait_for_everyone()
    records = result.pop("log", [])
    atomic_write_json(log_path, records)
    log[name] = records
    result["seconds"] = round(time.time() - start, 1)
    run.mark_done(name, {"result": result})
    run.finished.append(name)
    console.info(f"rahf: {name} done in {result['seconds']} s")
    return result


def save_pairs(path: Path, pairs: list[PreferencePair]) -> None:
    """One JSON object a line (prompt messages, chosen, rejected, origin): what :func:`read_pairs` reads."""
    lines = [json.dumps({"prompt": list(p.prompt), "chosen": p.chosen, "rejected": p.rejected, "origin": p.origin}) for p in pairs]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_pairs(path: Path) -> list[PreferencePair]:
    """The pairs :func:`save_pairs` wrote."""
    pairs = []
    for line in path.read_text().splitlines():
        if not line.strip():  # an empty split (validation_fraction=0) is written as one blank line
            continue
        row = json.loads(line)
        pairs.append(PreferencePair(tuple(row["prompt"]), row["chosen"], row["rejected"], row["origin"]))
    return pairs


def prepare_data(config: AlignConfig, folder: Path, *, rahf_halves: bool = True) -> dict:
    """Train / validation files; for RAHF (``rahf_halves``) also the step-1 and pattern halves,
    which baselines, training on all of ``train.jsonl``, neither need nor should fail on."""
    loaded = load_preferences(
        config.data, format=config.data_format, skip_invalid=config.skip_invalid, split=config.data_split,
        columns=config.data_columns,
    )
    train, validation = split_pairs(loaded.pairs, validation_fraction=config.validation_fraction, seed=config.seed)
    if config.max_pairs is not None:
        train = train[: config.max_pairs]
    if not train:
        raise DataError(f"{config.data}: no training pairs left after filtering and the validation split")
    save_pairs(folder / "train.jsonl", train)
    save_pairs(folder / "validation.jsonl", validation)
    stats = {"train": len(train), "validation": len(validation), "format": loaded.format, "invalid": loaded.invalid}
    if rahf_halves and config.patterns.disjoint_share > 0:  # share 0: train.jsonl feeds every step
        step1, patterns = halves(config, train)
        save_pairs(folder / "step1.jsonl", step1)
        save_pairs(folder / "patterns.jsonl", patterns)
        stats.update(step1=len(step1), patterns=len(patterns))
    return stats


def halves(config: AlignConfig, train: list[PreferencePair]) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """``(step-1 pairs, pattern pairs)``: prompt-disjoint halves of ``train`` (``patterns.disjoint_share``)."""
    from rahf.data.split import disjoint_halves

    step1, patterns = disjoint_halves(train, share=config.patterns.disjoint_share, seed=config.seed)
    for name, part in (("step 1", step1), ("steps 2-3", patterns)):
        if not part:
            raise DataError(
                f"{config.data}: patterns.disjoint_share={config.patterns.disjoint_share} leaves no pairs for {name}"
                f" out of {len(train)} training pairs: use more data, another share, or 0 to feed every step all pairs"
            )
    return step1, patterns


def read_halves(run: RunDir) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """The data stage's step-1 and pattern pairs (both ``train.jsonl`` when not split)."""
    data = run.stage("data")
    if (data / "step1.jsonl").is_file():
        return read_pairs(data / "step1.jsonl"), read_pairs(data / "patterns.jsonl")
    train = read_pairs(data / "train.jsonl")
    return train, train
