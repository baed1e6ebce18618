"""The spine: data -> step 1 (SCIT or Dual) -> step 2 patterns / targets -> step 3 fit -> export.

Each stage writes into ``RUN_DIR/<stage>/`` and finishes by writing ``DONE.json`` (sizes and
checksums of its files, and a digest of the earlier stages' outputs it was built from).
Rerunning the same command skips finished stages, redoes a stage whose files or inputs changed,
resumes an interrupted training stage from its newest complete checkpoint, and refuses to mix
runs of different configurations in one folder. RELIABILITY.md lists the faults this survives.
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
from rahf.io import (
    atomic_write_json,
    atomic_write_text,
    check_writable_dir,
    folder_manifest,
    inject_fault,
    is_main_process,
    join_process_group,
    manifest_problem,
    read_marker,
    remove_stale_temps,
    wait_for_everyone,
)
from rahf.models import resolve_model_path
from rahf.plumbing import num_layers
from rahf.preflight import preflight, target_layers

# Settings that do not change results; a rerun may change them freely.
_COSMETIC = {"report_to", "logging_steps", "run_dir", "device"}


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
        inject_fault(f"done:{name}", self.stage(name) / "DONE.json")
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
            changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
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
    inject_fault(f"stage:{name}")
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


def _save_pairs(path: Path, pairs: list[PreferencePair]) -> None:
    lines = [json.dumps({"prompt": list(p.prompt), "chosen": p.chosen, "rejected": p.rejected, "origin": p.origin}) for p in pairs]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_pairs(path: Path) -> list[PreferencePair]:
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
    _save_pairs(folder / "train.jsonl", train)
    _save_pairs(folder / "validation.jsonl", validation)
    stats = {"train": len(train), "validation": len(validation), "format": loaded.format, "invalid": loaded.invalid}
    if rahf_halves and config.patterns.disjoint_share > 0:  # share 0: train.jsonl feeds every step
        step1, patterns = halves(config, train)
        _save_pairs(folder / "step1.jsonl", step1)
        _save_pairs(folder / "patterns.jsonl", patterns)
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


def base_weights(config: AlignConfig, run: RunDir) -> str:
    """The weights step 3's adapter applies to: M_s for SCIT, the original model for Dual
    (M+, merged, with ``patterns.align_target: preferred``)."""
    if config.method == "scit":
        return str((run.stage("step1") / "merged").resolve())
    if config.patterns.align_target == "preferred":
        return str((run.stage("step1_preferred") / "merged").resolve())
    return resolve_model_path(config.model)


def align(config: AlignConfig, *, overwrite: bool = False) -> Path:
    """Run (or resume) the whole RAHF pipeline; returns ``RUN_DIR/final``.

    The run folder is locked for the whole run (:mod:`rahf.runlock`): one writer per folder.
    """
    from rahf.runlock import run_lock

    layers = target_layers(config)  # validate before any work
    preflight(config)
    join_process_group()
    with run_lock(config.run_dir), console.library_deprecations_ignored():  # rahf.console: peft's stale read
        return _align(config, layers, overwrite=overwrite)


def _align(config: AlignConfig, layers: list[int], *, overwrite: bool) -> Path:
    from rahf.convergence import check_lines, checks_records
    from rahf.models import load_tokenizer
    from rahf.preference.stage import step1_with_readiness

    run = RunDir(config.run_dir)
    run.check_config(config, overwrite=overwrite)
    tokenizer = load_tokenizer(config.model)
    log: dict[str, list] = {}

    data_stats = run_stage(run, "data", lambda out: prepare_data(config, out), log=log, seed=config.seed)
    step1_pairs, train = read_halves(run)  # train: the pairs steps 2-3 read patterns on

    # Step 1: teach the model what is preferred; check on held-out pairs that it separates.
    step1_dirs = {} if config.method == "scit" else {s: str(run.stage(f"step1_{s}")) for s in ("preferred", "dispreferred")}
    readiness = step1_with_readiness(config, run, step1_pairs, train, tokenizer, log)

    # Steps 2 and 3: patterns, targets, and the fitted adapter.
    base = base_weights(config, run)
    fit_result = run_stage(
        run, "fit", lambda out: fit_stage(config, run, train, tokenizer, layers, base, step1_dirs, out),
        log=log, seed=config.seed,
    )

    def export(out: Path) -> dict:
        from rahf.export import model_card, write_adapter, write_logs, write_merged

        write_adapter(run.stage("fit") / "adapter", out / "adapter", base)
        write_merged(out / "adapter", out / "merged", tokenizer)
        write_logs(log, out, extra=checks_records(readiness, fit_result))
        config.save(out / "config.yaml")
        card = model_card(
            config,
            title=f"RAHF-{config.method.upper()} adapter",
            summary=f"Aligned by representation engineering (RAHF, method **{config.method}**).",
            settings=f"Target layers (hidden_states indices) {layers}, alpha {config.patterns.alpha}, patterns on"
            f" `{config.pattern_reply}` replies; fitting LoRA r={config.fit.lora.r} on {config.fit.lora.target_modules}.",
            base=base, data_stats=data_stats, logs=log, tags=("representation-engineering", "alignment", "lora"),
            checks=check_lines(config, readiness, fit_result, data_stats),
        )
        atomic_write_text(out / "README.md", card)
        return {}

    run_stage(run, "final", export, log={}, main_only=True)
    print(f"rahf: aligned model in {run.stage('final')} (adapter/, merged/, README.md, loss.png)")
    return run.stage("final")


def fit_stage(config, run: RunDir, train, tokenizer, layers, base: str, step1_dirs, out: Path) -> dict:
    from rahf.convergence import ConvergenceLog, PlateauStop, held_out_examples, measure_progress
    from rahf.convergence import progress_line as convergence_line
    from rahf.fitting import FitCollator, FitTrainer, compute_cache, load_fit_model
    from rahf.patterns import fit_examples, pattern_passes
    from rahf.target_cache import CacheError, TargetCache
    from rahf.training import LossLogCallback, save_trained, train_resumably, training_arguments

    if config.patterns.align_target == "preferred":
        from rahf.preference.dual import load_preferred_target

        model, frozen = load_preferred_target(config, base, step1_dirs, layers)
    else:
        model, frozen = load_fit_model(config, base, step1_dirs, layers)
    if max(layers) > num_layers(model):
        raise ConfigError(f"patterns.target_layers go up to {max(layers)} but the model has {num_layers(model)} blocks")
    examples = fit_examples(train, tokenizer, config)
    log = LossLogCallback()
    held, held_source = held_out_examples(config, read_pairs(run.stage("data") / "validation.jsonl"), examples, tokenizer)
    progress, plateau = ConvergenceLog(held), PlateauStop(config.fit.plateau_window, config.fit.plateau_threshold)
    trainer = FitTrainer(
        model=model,
        args=training_arguments(config, config.fit.train, out / "checkpoints", stage="fit"),
        train_dataset=examples,
        data_collator=FitCollator(tokenizer.pad_token_id),
        callbacks=[progress, log, plateau],
    )
    progress.trainer = trainer
    trainer.setup_fit(
        layers=layers, alpha=config.patterns.alpha, passes=pattern_passes(config), frozen=frozen,
        pad_id=tokenizer.pad_token_id, truncate=config.fit.truncate_forward and config.fit.kl_weight == 0,
        batch_frozen=config.fit.batch_frozen, kl_weight=config.fit.kl_weight,
        group_by_length=config.fit.group_by_length,
    )
    if config.fit.targets == "cached":
        cache_dir = run.stage("targets")

        def build_cache() -> None:
            if is_main_process():
                compute_cache(trainer, examples, cache_dir, batch_size=config.fit.train.batch_size, dtype=config.fit.cache_dtype)
                run.mark_done("targets")
            wait_for_everyone()

        if not run.is_done("targets"):  # missing, cut off, or a file fails its checksum: recompute
            build_cache()
        try:
            cache = TargetCache(cache_dir)
        except CacheError as err:  # a marker from an older layout that the cache itself rejects
            print(f"rahf: {err}; recomputing the target cache")
            build_cache()
            cache = TargetCache(cache_dir)
        trainer.data_collator = FitCollator(tokenizer.pad_token_id, cache)
    train_resumably(trainer)
    save_trained(model, out, merged=False)
    result = {"log": log.records, "examples": len(examples), "layers": layers,
              "steps": trainer.state.global_step, "plateau_stop": plateau.stopped_at}
    if held:
        result["convergence"] = {"examples": len(held), "source": held_source, **measure_progress(trainer, held)}
        if is_main_process():
            print(f"rahf: fit reached, per layer, this share of the target on {len(held)} {held_source} examples"
                  f" (1.0 = reached): {convergence_line(result['convergence'])}")
    return result
