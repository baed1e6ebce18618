"""The spine: data -> step 1 (SCIT or Dual) -> step 2 patterns / targets -> step 3 fit -> export.

Each stage writes into ``RUN_DIR/<stage>/`` and finishes by writing ``DONE.json`` (sizes and
checksums of its files). Rerunning the same command skips finished stages, resumes an
interrupted training stage from its newest checkpoint, and refuses to mix runs of different
configurations in one folder.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from rahf.config import AlignConfig, ConfigError, check_against_model
from rahf.data import PreferencePair, load_preferences, split_pairs
from rahf.data.schema import DataError
from rahf.io import (
    atomic_write_json,
    atomic_write_text,
    file_digest,
    folder_manifest,
    is_main_process,
    wait_for_everyone,
)
from rahf.models import model_config, resolve_model_path
from rahf.plumbing import num_layers

# Settings that do not change results; a rerun may change them freely.
_COSMETIC = {"report_to", "logging_steps", "run_dir", "device"}


class RunDir:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def stage(self, name: str) -> Path:
        return self.root / name

    def is_done(self, name: str) -> bool:
        marker = self.stage(name) / "DONE.json"
        if not marker.is_file():
            return False
        try:
            recorded = json.loads(marker.read_text())["files"]
        except (json.JSONDecodeError, KeyError):
            print(f"rahf: {marker} is unreadable; redoing stage {name}")
            return False
        for rel, meta in recorded.items():
            path = self.stage(name) / rel
            if not path.is_file() or path.stat().st_size != meta["size"] or (
                meta.get("sha256") and file_digest(path) != meta["sha256"]
            ):
                print(f"rahf: {path} is missing or changed since stage {name} finished; redoing it")
                return False
        return True

    def mark_done(self, name: str, extra: dict | None = None) -> None:
        files = folder_manifest(self.stage(name))
        files = {k: v for k, v in files.items() if not k.startswith("checkpoints/")}
        atomic_write_json(self.stage(name) / "DONE.json", {"stage": name, "finished": time.time(), "files": files, **(extra or {})})

    def check_config(self, config: AlignConfig, *, overwrite: bool) -> None:
        """Save the config; a rerun must use the same one (cosmetic fields aside)."""
        path = self.root / "config.json"
        current = {k: v for k, v in asdict(config).items() if k not in _COSMETIC}
        if path.is_file() and not overwrite:
            saved = json.loads(path.read_text())
            changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
            if changed:
                raise ConfigError(
                    f"{self.root} holds a run with a different configuration ({', '.join(changed)} differ):"
                    " use another --run-dir, or --overwrite to start again"
                )
        if overwrite and self.root.exists() and is_main_process():
            import shutil

            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, current)
        config.save(self.root / "config.yaml")


def run_stage(
    run: RunDir, name: str, work: Callable[[Path], dict | None], *, log: dict[str, list], main_only: bool = False
) -> dict:
    """Run ``work(stage_dir)`` unless the stage is done; keep its training log for export.

    Training stages run on every process of a distributed run (only rank 0 writes files);
    ``main_only`` stages run on rank 0 while the others wait.
    """
    folder = run.stage(name)
    log_path = folder / "log.json"
    wait_for_everyone()
    if run.is_done(name):
        print(f"rahf: skipping {name} (already done in {folder})")
        log[name] = json.loads(log_path.read_text()) if log_path.is_file() else []
        return json.loads((folder / "DONE.json").read_text()).get("result", {})
    print(f"rahf: stage {name} ...")
    start = time.time()
    folder.mkdir(parents=True, exist_ok=True)
    result = (work(folder) if is_main_process() or not main_only else None) or {}
    wait_for_everyone()
    records = result.pop("log", [])
    atomic_write_json(log_path, records)
    log[name] = records
    result["seconds"] = round(time.time() - start, 1)
    run.mark_done(name, {"result": result})
    print(f"rahf: {name} done in {result['seconds']} s")
    return result


def _save_pairs(path: Path, pairs: list[PreferencePair]) -> None:
    lines = [json.dumps({"prompt": list(p.prompt), "chosen": p.chosen, "rejected": p.rejected, "origin": p.origin}) for p in pairs]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_pairs(path: Path) -> list[PreferencePair]:
    pairs = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        pairs.append(PreferencePair(tuple(row["prompt"]), row["chosen"], row["rejected"], row["origin"]))
    return pairs


def prepare_data(config: AlignConfig, folder: Path) -> dict:
    loaded = load_preferences(
        config.data, format=config.data_format, skip_invalid=config.skip_invalid, split=config.data_split
    )
    train, validation = split_pairs(loaded.pairs, validation_fraction=config.validation_fraction, seed=config.seed)
    if config.max_pairs is not None:
        train = train[: config.max_pairs]
    if not train:
        raise DataError(f"{config.data}: no training pairs left after filtering and the validation split")
    _save_pairs(folder / "train.jsonl", train)
    _save_pairs(folder / "validation.jsonl", validation)
    return {"train": len(train), "validation": len(validation), "format": loaded.format, "invalid": loaded.invalid}


def base_weights(config: AlignConfig, run: RunDir) -> str:
    """The weights step 3's adapter applies to: M_s for SCIT, the original model for Dual."""
    if config.method == "scit":
        return str((run.stage("step1") / "merged").resolve())
    return resolve_model_path(config.model)


def target_layers(config: AlignConfig) -> list[int]:
    return check_against_model(config, model_config(config.model).num_hidden_layers)


def align(config: AlignConfig, *, overwrite: bool = False) -> Path:
    """Run (or resume) the whole RAHF pipeline; returns ``RUN_DIR/final``."""
    from rahf.models import load_tokenizer

    run = RunDir(config.run_dir)
    layers = target_layers(config)  # validate before any work
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState()  # joins the process group so stages can wait for each other
    run.check_config(config, overwrite=overwrite)
    tokenizer = load_tokenizer(config.model)
    log: dict[str, list] = {}

    data_stats = run_stage(run, "data", lambda out: prepare_data(config, out), log=log)
    train = read_pairs(run.stage("data") / "train.jsonl")

    # Step 1: teach the model what is preferred.
    step1_dirs: dict[str, str] = {}
    if config.method == "scit":
        from rahf.preference.scit import train_scit

        run_stage(run, "step1", lambda out: {"log": train_scit(config, train, tokenizer, out)}, log=log)
    else:
        from rahf.preference.dual import train_side

        for side in ("preferred", "dispreferred"):
            name = f"step1_{side}"
            run_stage(run, name, lambda out, side=side: {"log": train_side(config, train, tokenizer, side, out)}, log=log)
            step1_dirs[side] = str(run.stage(name))

    # Steps 2 and 3: patterns, targets, and the fitted adapter.
    base = base_weights(config, run)
    run_stage(run, "fit", lambda out: fit_stage(config, run, train, tokenizer, layers, base, step1_dirs, out), log=log)

    def export(out: Path) -> dict:
        from rahf.export import model_card, write_adapter, write_logs, write_merged

        write_adapter(run.stage("fit") / "adapter", out / "adapter", base)
        write_merged(out / "adapter", out / "merged", tokenizer)
        write_logs(log, out)
        config.save(out / "config.yaml")
        card = model_card(config, layers=layers, base=base, data_stats=data_stats, logs=log, metrics={})
        atomic_write_text(out / "README.md", card)
        return {}

    run_stage(run, "final", export, log={}, main_only=True)
    print(f"rahf: aligned model in {run.stage('final')} (adapter/, merged/, README.md, loss.png)")
    return run.stage("final")


def fit_stage(config, run: RunDir, train, tokenizer, layers, base: str, step1_dirs, out: Path) -> dict:
    from rahf.fitting import FitCollator, FitTrainer, compute_cache, load_fit_model
    from rahf.patterns import fit_examples, pattern_passes
    from rahf.target_cache import TargetCache
    from rahf.training import LossLogCallback, save_trained, train_resumably, training_arguments

    model, frozen = load_fit_model(config, base, step1_dirs, layers)
    if max(layers) > num_layers(model):
        raise ConfigError(f"patterns.target_layers go up to {max(layers)} but the model has {num_layers(model)} blocks")
    examples = fit_examples(train, tokenizer, config)
    log = LossLogCallback()
    trainer = FitTrainer(
        model=model,
        args=training_arguments(config, config.fit.train, out / "checkpoints", stage="fit"),
        train_dataset=examples,
        data_collator=FitCollator(tokenizer.pad_token_id),
        callbacks=[log],
    )
    trainer.setup_fit(
        layers=layers, alpha=config.patterns.alpha, passes=pattern_passes(config), frozen=frozen,
        pad_id=tokenizer.pad_token_id, truncate=config.fit.truncate_forward and config.fit.kl_weight == 0,
        batch_frozen=config.fit.batch_frozen, kl_weight=config.fit.kl_weight,
    )
    if config.fit.targets == "cached":
        cache_dir = run.stage("targets")
        if not run.is_done("targets") and is_main_process():
            compute_cache(trainer, examples, cache_dir, batch_size=config.fit.train.batch_size)
            run.mark_done("targets")
        wait_for_everyone()
        trainer.data_collator = FitCollator(tokenizer.pad_token_id, TargetCache(cache_dir))
    train_resumably(trainer)
    save_trained(model, out, merged=False)
    return {"log": log.records, "examples": len(examples), "layers": layers}


def plan(config: AlignConfig) -> dict:
    """What ``align`` would do, from the data and config alone (no weights loaded)."""
    import math

    from rahf.data.render import TruncationStats, encode
    from rahf.models import load_tokenizer

    layers = target_layers(config)
    model_cfg = model_config(config.model)
    loaded = load_preferences(config.data, format=config.data_format, skip_invalid=config.skip_invalid, split=config.data_split)
    train, validation = split_pairs(loaded.pairs, validation_fraction=config.validation_fraction, seed=config.seed)
    train = train[: config.max_pairs] if config.max_pairs else train
    if not train:
        raise DataError(f"{config.data}: no training pairs left after filtering and the validation split")
    tokenizer = load_tokenizer(config.model)
    stats = TruncationStats()
    tokens = 0
    for pair in train:
        for reply in (pair.chosen, pair.rejected):
            encoded = encode(tokenizer, pair.prompt, reply, max_prompt_tokens=config.max_prompt_tokens, max_reply_tokens=config.reply_window)
            stats.add(encoded, count_prompt=reply is pair.chosen)
            tokens += len(encoded.input_ids)

    def steps(train_cfg, examples: int) -> int:
        if train_cfg.max_steps > 0:
            return train_cfg.max_steps
        return math.ceil(train_cfg.epochs * math.ceil(examples / (train_cfg.batch_size * train_cfg.grad_accum)))

    step1_examples = 2 * len(train) if config.method == "scit" else len(train)
    fit_examples = len(train) * (2 if config.pattern_reply == "both" else 1)
    stages = (["step1"] if config.method == "scit" else ["step1_preferred", "step1_dispreferred"]) + ["fit", "final"]
    hidden, n_layers = model_cfg.hidden_size, model_cfg.num_hidden_layers
    params = n_layers * 12 * hidden * hidden + 2 * model_cfg.vocab_size * hidden  # rough, for the estimate
    bytes_per = 2 if config.dtype == "bfloat16" else 4
    return {
        "method": config.method,
        "model": config.model,
        "data": {"source": config.data, "format": loaded.format, "train_pairs": len(train), "validation_pairs": len(validation), "invalid": loaded.invalid},
        "stages": stages,
        "target_layers": layers,
        "steps": {"step1 (each side)" if config.method == "dual" else "step1": steps(config.step1.train, step1_examples), "fit": steps(config.fit.train, fit_examples)},
        "examples": {"step1": step1_examples, "fit": fit_examples},
        "tokens": {"train_total": tokens, "truncated_prompts": stats.prompts_truncated, "truncated_replies": stats.replies_truncated},
        "estimated_weights_gb": round(params * bytes_per / 1e9, 2),
        "run_dir": config.run_dir,
    }
