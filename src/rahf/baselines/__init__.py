"""The SFT and DPO baselines, run through the same data stage and outputs as ``rahf align``.

    from rahf.baselines import train_dpo, train_sft
    from rahf.config import BaselineConfig
    final = train_dpo(BaselineConfig(method="dpo", model="smollm2", data="builtin"))  # runs/dpo
    # final/adapter, final/merged, README.md, metrics.jsonl, loss.png, config.yaml

Stages: ``RUN_DIR/data`` (the same split as align) -> ``RUN_DIR/sft`` or ``RUN_DIR/dpo`` (TRL
trainer, checkpoints in ``<stage>/checkpoints``) -> ``RUN_DIR/final`` (align's layout). Rerunning
skips finished stages and resumes an interrupted training stage.

Both baselines tokenise with :func:`rahf.data.render.encode`, as align and ``rahf eval`` do, so
every method sees the same prompt rendering and the same ``max_prompt_tokens`` /
``reply_window`` windows; the datasets handed to TRL are still in its conversational formats.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

from rahf.config import BaselineConfig, ConfigError, RunConfig

__all__ = ["train_dpo", "train_sft"]

Method = Literal["sft", "dpo"]
# The training stage: (config, training pairs, tokenizer, stage folder, model_path=) -> the per-step log.
StageFn = Callable[..., list[dict]]


def train_sft(config: BaselineConfig, *, overwrite: bool = False) -> Path:
    """Supervised fine-tuning on the chosen replies (TRL ``SFTTrainer``); returns ``RUN_DIR/final``."""
    from rahf.baselines.sft import sft_stage

    return run_baseline(config, "sft", sft_stage, overwrite=overwrite)


def train_dpo(config: BaselineConfig, *, overwrite: bool = False) -> Path:
    """Direct preference optimisation (TRL ``DPOTrainer``); returns ``RUN_DIR/final``."""
    from rahf.baselines.dpo import dpo_stage

    return run_baseline(config, "dpo", dpo_stage, overwrite=overwrite)


def run_baseline(config: BaselineConfig, method: Method, stage: StageFn, *, overwrite: bool = False) -> Path:
    """data -> ``method`` -> final, with align's RunDir, resume rules, run-folder lock and export."""
    from rahf.io import join_process_group
    from rahf.runlock import run_lock

    if config.method != method:  # the config also names the default run folder: say, don't guess
        raise ConfigError(f"train_{method} got a config with method={config.method}: load it with method={method}")
    join_process_group()
    with run_lock(config.run_dir):  # one writer per run folder (rahf.runlock)
        return _run_baseline(config, method, stage, overwrite=overwrite)


def _run_baseline(config: BaselineConfig, method: Method, stage: StageFn, *, overwrite: bool) -> Path:
    from rahf.io import atomic_write_text
    from rahf.models import load_tokenizer, resolve_model_path
    from rahf.runs import RunDir, prepare_data, read_pairs, run_stage

    run = RunDir(config.run_dir)
    run.check_config(config, overwrite=overwrite)
    base = resolve_model_path(config.model)  # resolved once; the stage loads this path
    tokenizer = load_tokenizer(base)
    log: dict[str, list] = {}

    data_stats = run_stage(run, "data", lambda out: prepare_data(config, out, rahf_halves=False), log=log)
    train = read_pairs(run.stage("data") / "train.jsonl")
    run_stage(run, method, lambda out: {"log": stage(config, train, tokenizer, out, model_path=base)}, log=log)

    def export(out: Path) -> dict:
        from rahf.export import write_adapter, write_logs, write_merged

        trained = run.stage(method)
        if (trained / "adapter").is_dir():
            write_adapter(trained / "adapter", out / "adapter", base)
            write_merged(out / "adapter", out / "merged", tokenizer)
        else:  # full fine-tuning: the trained weights are the model; there is no adapter
            _copy_model(trained / "model", out / "merged")
        write_logs(log, out)
        config.save(out / "config.yaml")
        atomic_write_text(out / "README.md", baseline_card(config, method, base=base, data_stats=data_stats, logs=log))
        return {}

    run_stage(run, "final", export, log={}, main_only=True)
    print(f"rahf: {method} model in {run.stage('final')} (merged/, README.md, loss.png)")
    return run.stage("final")


def train_and_save(trainer, out: Path, tokenizer) -> list[dict]:
    """Train a TRL trainer as a stage (:func:`rahf.trainer.train_stage`: resume from
    ``out/checkpoints``, save ``out/adapter`` or ``out/model``); return the per-step log."""
    from rahf.trainer import train_stage

    return train_stage(trainer, out, merged=False, tokenizer=tokenizer)["log"]


def _copy_model(src: Path, out: Path) -> None:
    import shutil

    from rahf.io import atomic_dir

    def build(tmp: Path) -> None:
        for item in src.iterdir():
            if item.is_file():
                shutil.copy2(item, tmp / item.name)

    atomic_dir(out, build)


def trl_arguments(config: RunConfig, cls: type, out: Path, *, stage: str, train=None, **extra):
    """A TRL config (``SFTConfig`` / ``DPOConfig``) with exactly align's Trainer arguments
    (:func:`rahf.trainer.training_arguments`); ``train``: the budget (default: the baseline's)."""
    from rahf.trainer import training_arguments

    return training_arguments(config, train or config.train, out, stage=stage, cls=cls, **extra)


class FiniteLoss:
    """Trainer mixin: stop at the first NaN/inf loss with :class:`rahf.trainer.TrainingError`."""

    stage = "baseline"

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from rahf.trainer import check_finite

        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        check_finite(result[0] if return_outputs else result, self, self.stage)
        return result


def baseline_card(config: BaselineConfig, method: Method, *, base: str, data_stats: dict, logs: dict) -> str:
    """The shared model card, filled in for a baseline."""
    import trl

    from rahf.export import model_card

    settings = config
    weights = (
        "full fine-tuning"
        if settings.full_finetune
        else f"LoRA r={settings.lora.r}, alpha={settings.lora.alpha}, modules {settings.lora.target_modules}"
    )
    objective = (
        f"DPO ({settings.loss_type} loss, beta {settings.beta}"
        + (f", plus {settings.sft_weight} x the chosen reply's NLL" if settings.sft_weight else "")
        + "), reference = the starting model"
        if method == "dpo"
        else "SFT on the chosen replies, loss on reply tokens only"
    )
    trainer = "DPOTrainer" if method == "dpo" else "SFTTrainer"
    return model_card(
        config,
        title=f"{method.upper()} baseline",
        summary=f"A baseline for comparison with RAHF: TRL {trl.__version__} {trainer}.",
        settings=f"{objective}; {weights}; learning rate {settings.train.learning_rate}, batch"
        f" {settings.train.batch_size} x accumulation {settings.train.grad_accum}.",
        base=base, data_stats=data_stats, logs=logs, has_adapter=not settings.full_finetune,
        tags=("baseline", method, "trl"),
    )
