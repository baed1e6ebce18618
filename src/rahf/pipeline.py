"""The RAHF spine: data -> step 1 (+ readiness) -> step 2 patterns / targets -> step 3 fit -> export.

Two ways in. :func:`align` takes names (a model, a data file) and writes a resumable run folder
(``rahf align``); :func:`align_model` takes objects a user already has, as TRL's trainers do:

    from rahf import AlignConfig, align_model
    config = AlignConfig(method="dual", run_dir="runs/mine")
    aligned = align_model(model, tokenizer, pairs, config)   # a PeftModel on `model`
    aligned.merge_and_unload().save_pretrained("aligned")

Each stage is a run-folder stage (:mod:`rahf.runs`); the method (SCIT or Dual) is chosen once
(:func:`rahf.method.method_for`) and the config resolved once (:func:`rahf.plan.plan_run`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from rahf import console
from rahf.config import AlignConfig
from rahf.data.schema import PreferencePair
from rahf.io import join_process_group
from rahf.runs import RunDir, prepare_data, read_halves, run_stage


def align(config: AlignConfig, *, overwrite: bool = False) -> Path:
    """Run (or resume) the whole RAHF pipeline; returns ``RUN_DIR/final``.

    The run folder is locked for the whole run (:mod:`rahf.runlock`): one writer per folder.
    """
    from rahf.preflight import preflight, target_layers
    from rahf.runlock import run_lock

    layers = target_layers(config)  # validate before any work
    preflight(config)
    join_process_group()
    with run_lock(config.run_dir), console.library_deprecations_ignored():  # rahf.console: peft's stale read
        return _align(config, layers, overwrite=overwrite)


def _align(config: AlignConfig, layers: list[int], *, overwrite: bool) -> Path:
    from rahf.export import export_aligned
    from rahf.method.fit import fit_stage
    from rahf.method.step1 import step1_with_readiness
    from rahf.plan import plan_run

    run = RunDir(config.run_dir)
    run.check_config(config, overwrite=overwrite)
    plan = plan_run(config, layers=layers)
    log: dict[str, list] = {}

    data_stats = run_stage(run, "data", lambda out: prepare_data(config, out), log=log, seed=config.seed)
    step1_pairs, train = read_halves(run)  # train: the pairs steps 2-3 read patterns on

    # Step 1: teach the model what is preferred; check on held-out pairs that it separates.
    readiness = step1_with_readiness(plan, run, step1_pairs, train, log)

    # Steps 2 and 3: patterns, targets, and the adapter fitted on the weights `base`.
    base = plan.method.fit_weights(plan, run)
    fit_result = run_stage(run, "fit", lambda out: fit_stage(plan, run, train, base, out), log=log, seed=config.seed)

    # Use: the adapter, the merged model, the model card.
    run_stage(run, "final", lambda out: export_aligned(plan, run, base, out, logs=log, readiness=readiness,
                                                        fit_result=fit_result, data_stats=data_stats),
              log={}, main_only=True)
    print(f"rahf: aligned model in {run.stage('final')} (adapter/, merged/, README.md, loss.png)")
    return run.stage("final")


def align_model(model: Any, tokenizer: Any, pairs: Any, config: AlignConfig | None = None, *,
                overwrite: bool = False) -> Any:
    """Align ``model`` on ``pairs`` and return it wrapped with the fitted adapter (a ``PeftModel``).

    ``pairs``: a list of :class:`rahf.data.PreferencePair`, or a ``datasets.Dataset`` with
    ``prompt`` / ``chosen`` / ``rejected`` columns in any format ``rahf data`` reads. The run is
    the same as :func:`align`'s (same seed, same numbers), written under ``config.run_dir``: the
    model, tokenizer and pairs are saved in ``RUN_DIR/inputs`` and every stage resumes as usual
    (other pairs in the same folder are refused; the model is saved once: another model needs
    another ``run_dir`` or ``overwrite=True``, which starts the folder afresh). For Dual (adapter on the original weights) the adapter is put on ``model`` itself; for SCIT it
    applies to the step-1 model, which is loaded from the run folder.
    """
    import json
    import shutil

    from peft import PeftModel

    from rahf.config import ConfigError
    from rahf.io import atomic_dir, atomic_write_text, is_main_process, wait_for_everyone

    config = config or AlignConfig()
    inputs = Path(config.run_dir) / "inputs"
    lines = "".join(json.dumps(row) + "\n" for row in pair_rows(pairs))
    saved = inputs / "pairs.jsonl"
    if overwrite and is_main_process():
        shutil.rmtree(config.run_dir, ignore_errors=True)  # align's --overwrite would remove the inputs too
    elif saved.is_file() and saved.read_text() != lines:
        raise ConfigError(f"{config.run_dir} holds a run on other pairs: use another run_dir, or overwrite=True")
    if is_main_process() and not (inputs / "model" / "config.json").is_file():
        def save(tmp: Path) -> None:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)

        atomic_dir(inputs / "model", save)
    atomic_write_text(saved, lines)
    wait_for_everyone()
    named = dataclasses.replace(config, model=str(inputs / "model"), data=str(inputs / "pairs.jsonl"),
                                data_format="auto", data_split=None, data_columns=None)
    final = align(named)
    adapter = final / "adapter"
    if _same_path(_adapter_base(adapter), inputs / "model"):
        return PeftModel.from_pretrained(model, str(adapter))
    from rahf.models import load_model

    weights = load_model(_adapter_base(adapter), dtype=config.dtype, device=config.device)
    return PeftModel.from_pretrained(weights, str(adapter))


def _adapter_base(adapter: Path) -> str:
    import json

    return json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]


def _same_path(a: str | Path, b: str | Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def pair_rows(pairs: Any) -> list[dict]:
    """Rows rahf's readers auto-detect: conversational rows for PreferencePairs, a dataset's own
    rows (``prompt`` / ``chosen`` / ``rejected`` in any format ``rahf data`` reads)."""
    if hasattr(pairs, "column_names"):  # a datasets.Dataset
        return [dict(row) for row in pairs]
    rows = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, PreferencePair):
            raise TypeError(f"pairs[{i}]: expected a rahf.data.PreferencePair or a datasets.Dataset, got {type(pair).__name__}")
        rows.append({"prompt": [dict(m) for m in pair.prompt],
                     "chosen": [{"role": "assistant", "content": pair.chosen}],
                     "rejected": [{"role": "assistant", "content": pair.rejected}]})
    return rows
