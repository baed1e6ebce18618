"""The one training-stage runner: load -> LoRA -> Trainer -> resume -> save, and what it shares.

Every training stage (SCIT and Dual step 1, the fit, the SFT and DPO baselines, the reward model)
builds its Trainer arguments with :func:`training_arguments`, its trainable model with
:func:`trainable_model` (or its own loader plus :func:`add_lora`) and runs with
:func:`train_stage`: resume from the newest complete checkpoint, train, save the weights.

All stages run on ``transformers.Trainer`` so bf16, gradient checkpointing, gradient
accumulation, ``report_to`` logging and ``accelerate launch`` (DDP, DeepSpeed) work unchanged.

Resume is exact: a checkpoint holds the weights, optimizer, scheduler and RNG states, and the
Trainer's seedable sampler (``data_seed``) with ``skip_first_batches`` replays the same batch
order, so a run stopped at any step and resumed ends with the same weights as one that was never
stopped. Each checkpoint gets a completion marker (:data:`CHECKPOINT_MARKER`, sizes and sha256 of
its files) once the Trainer has finished writing it; a checkpoint without a valid marker was cut
off mid-save or damaged later, and resume falls back to the newest good one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from rahf import console
from rahf.config import AlignConfig, ConfigError, LoraSettings, TrainSettings
from rahf.faults import fault_point, poisoned
from rahf.io import (
    HASH_LIMIT,
    atomic_write_json,
    folder_manifest,
    is_main_process,
    manifest_problem,
    read_marker,
    wait_for_everyone,
)

CHECKPOINT_MARKER = "rahf_checkpoint.json"


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says where it stopped."""


def lora_config(settings: LoraSettings, *, blocks: Sequence[int] | None = None) -> LoraConfig:
    """PEFT LoRA config; ``blocks`` limits it to those 0-based decoder blocks."""
    targets = settings.target_modules
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        layers_to_transform=list(blocks) if blocks is not None else None,
        task_type="CAUSAL_LM",
    )


def add_lora(
    model, settings: LoraSettings, *, name: str = "default", blocks: Sequence[int] | None = None
) -> PeftModel:
    """Wrap ``model`` with a new trainable adapter (or add one to a PeftModel).

    Adapters that get saved are called "default": PEFT writes other names into sub-folders.
    ``all-linear`` with ``blocks`` is spelt out as the blocks' linear module names (PEFT takes
    no block restriction with ``all-linear``).
    """
    if blocks is not None and settings.target_modules == ["all-linear"]:
        settings = dataclasses.replace(settings, target_modules=block_linear_names(model))
    config = lora_config(settings, blocks=blocks)
    if isinstance(model, PeftModel):
        model.add_adapter(name, config)
        model.set_adapter(name)
        return model
    with console.library_deprecations_ignored():
        return get_peft_model(model, config, adapter_name=name)


def block_linear_names(model) -> list[str]:
    """Names of the linear modules inside the decoder blocks (``q_proj``, ``down_proj`` ...),
    seen through LoRA layers already there."""
    from rahf.hidden_states import decoder_blocks

    names = set()
    for name, module in decoder_blocks(model).named_modules():
        parts = name.split(".")
        if not isinstance(module, torch.nn.Linear) or any(p.startswith("lora_") for p in parts):
            continue
        names.add(parts[-2] if parts[-1] == "base_layer" else parts[-1])
    return sorted(names)


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls run at 2-3x the fp32 rate (bench/efficiency.py); without
    them torch emulates bf16 and autocast only costs time."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # private helpers; a torch without them gets fp32
        return False


def use_bf16(config: AlignConfig) -> bool:
    """bf16 autocast with fp32 master weights: by default wherever the hardware computes bf16
    natively (bf16 GPUs; CPUs with AVX-512 BF16 or AMX); ``mixed_precision`` forces it on or off."""
    if config.mixed_precision != "auto":
        return config.mixed_precision == "bf16"
    if config.dtype == "float32":
        return False
    on_gpu = torch.cuda.is_available() and config.device != "cpu"
    return torch.cuda.is_bf16_supported() if on_gpu else cpu_has_native_bf16()



def training_arguments(
    config: AlignConfig, train: TrainSettings, output_dir: Path, *, stage: str, cls: type = TrainingArguments, **extra
) -> TrainingArguments:
    """A stage's Trainer arguments: ``train`` is its budget, ``config`` the run-wide settings
    (logging, checkpoints, seed, precision, device). See :func:`trainer_arguments`.

    Gradient checkpointing is decided here (:func:`rahf.memory.choose_checkpointing`); the
    decision is on the arguments as ``rahf_checkpointing`` (:func:`train_stage` records it in the
    stage's result) and, for ``auto``, printed in one line. Ranks of a distributed run agree:
    on if any rank needs it, so all run the same backward."""
    from rahf.memory import choose_checkpointing

    choice = choose_checkpointing(config, train, stage)

    def build(checkpointing: bool) -> TrainingArguments:
        return trainer_arguments(
            train, output_dir, cls=cls, seed=config.seed, bf16=use_bf16(config),
            use_cpu=(config.device == "cpu") or not torch.cuda.is_available(), logging_steps=config.logging_steps,
            save_steps=config.save_steps, report_to=config.report_to, run_name=f"{Path(config.run_dir).name}-{stage}",
            checkpointing=checkpointing, **extra,
        )

    args = build(choice.enabled)
    agreed = _agreed_flag(choice.enabled, args.device)
    if agreed != choice.enabled:  # another rank's estimate is over its budget
        choice = dataclasses.replace(choice, enabled=agreed, budget_from=f"{choice.budget_from}; on for another rank")
        args = build(agreed)
    args.rahf_checkpointing = choice.record()
    if choice.setting == "auto" and is_main_process():
        console.info(choice.line())
    return args


def _agreed_flag(flag: bool, device) -> bool:
    """``flag`` or-ed over the ranks of a distributed run (itself outside one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def trainer_arguments(
    train: TrainSettings, output_dir: str | Path, *, cls: type = TrainingArguments, seed: int, bf16: bool,
    use_cpu: bool, logging_steps: int, save_steps: int = 500, report_to: list[str] | str = "none",
    run_name: str | None = None, checkpointing: bool = False, **extra,
) -> TrainingArguments:
    """The Trainer arguments of every training stage, built here only.

    ``cls`` is ``TrainingArguments`` or a TRL config (``SFTConfig``, ``DPOConfig``,
    ``RewardConfig``) that gets exactly these values; ``extra`` sets its own fields or overrides
    ours (the reward model: ``save_strategy="no"``). TRL's defaults that differ from
    transformers' (gradient checkpointing on, bf16 on) are overridden by these values.
    """
    base = TrainingArguments(
        output_dir=str(output_dir),
        learning_rate=train.learning_rate,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        warmup_steps=train.warmup_ratio,  # transformers 5: a float < 1 is a ratio
        lr_scheduler_type=train.lr_scheduler,
        weight_decay=train.weight_decay,
        logging_steps=logging_steps,
        save_steps=save_steps,
        save_total_limit=2,
        save_strategy="steps",
        report_to=report_to,
        run_name=run_name,
        seed=seed,
        data_seed=seed,
        bf16=bf16,
        activation_checkpointing=checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=console.is_quiet(),  # the bar itself is StageProgress (train_resumably)
        use_cpu=use_cpu,
    )
    _ = base.device  # sets up accelerate's process state, as the Trainer would
    refuse_unsharded_fsdp(base.distributed_state.distributed_type if base.distributed_state else None)
    if cls is TrainingArguments and not extra:
        return base
    values = base.to_dict()
    values["hub_token"] = base.hub_token  # to_dict masks tokens
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return cls(**{k: v for k, v in values.items() if k in names and k not in extra}, **extra)


# Where accelerate 1.15 turns a requested FSDP into FSDP (``AcceleratorState``): multi-device
# accelerator processes. Anywhere else (CPU ranks: ``MULTI_CPU``) the request is dropped.
FSDP_CAPABLE = ("MULTI_GPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA", "MULTI_NPU", "MULTI_XPU", "MULTI_HPU", "MULTI_NEURON")


def fsdp_requested() -> bool:
    """``accelerate launch`` with an FSDP config (``configs/accelerate/fsdp.yaml``) sets this."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def refuse_unsharded_fsdp(distributed_type) -> None:
    """FSDP requested where accelerate will not shard: refuse rather than train as plain DDP.

    ``distributed_type`` is accelerate's ``DistributedType`` of this process (or its value, or
    None when there is no distributed state). On CPU ranks accelerate ignores the request without
    a word, so an "FSDP" run would hold the whole model on every rank.
    """
    if not fsdp_requested():
        return
    kind = getattr(distributed_type, "value", distributed_type) or "NO"
    if kind in FSDP_CAPABLE or kind == "FSDP":
        return
    raise ConfigError(
        f"FSDP was requested (ACCELERATE_USE_FSDP=true, e.g. configs/accelerate/fsdp.yaml) but these processes run"
        f" as {kind}: accelerate shards only across GPUs/accelerators, so nothing would be sharded. On CPU launch"
        " with configs/accelerate/ddp.yaml instead; for FSDP run the same config on GPUs"
    )


def trainable_model(config: AlignConfig, path: str, lora: LoraSettings | None, *, blocks: Sequence[int] | None = None):
    """The weights at ``path`` (already resolved: :class:`rahf.plan.RunPlan`), with a new LoRA
    adapter unless ``lora`` is None (full fine-tuning)."""
    from rahf.models import load_model

    model = load_model(path, dtype=config.dtype, device=config.device)
    return model if lora is None else add_lora(model, lora, blocks=blocks)


def train_stage(trainer: Trainer, out: Path, *, merged: bool, tokenizer=None, model=None) -> dict:
    """Run a built trainer as a stage: resume from ``out/checkpoints``, train, save the weights
    (:func:`save_trained`). Returns ``{"log": per-step records, "steps": optimizer steps}`` and,
    from :func:`training_arguments`, ``"checkpointing"``: whether it was on, and why."""
    log = next((c for c in trainer.callback_handler.callbacks if isinstance(c, LossLogCallback)), None)
    if log is None:
        log = LossLogCallback()
        trainer.add_callback(log)
    train_resumably(trainer)
    save_trained(model if model is not None else trainer.model, out, merged=merged, tokenizer=tokenizer)
    result = {"log": log.records, "steps": trainer.state.global_step}
    choice = getattr(trainer.args, "rahf_checkpointing", None)  # set by training_arguments
    return result | ({"checkpointing": choice} if choice else {})


class TrainingInterrupted(TrainingError):
    """SIGTERM / SIGINT stopped training at a step boundary after saving a checkpoint.

    ``exit_code`` is the shell convention for death by that signal (130 for SIGINT, 143 for
    SIGTERM), so schedulers and scripts see an interrupted run, not a finished one.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


def checkpoint_step(folder: Path) -> int:
    suffix = folder.name[len(PREFIX_CHECKPOINT_DIR) + 1 :]
    return int(suffix) if suffix.isdigit() else -1


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be resumed from, or None if its marker vouches for every file."""
    marker = read_marker(folder / CHECKPOINT_MARKER)
    if marker is None:
        if (folder / CHECKPOINT_MARKER).exists():
            return f"its marker {CHECKPOINT_MARKER} is unreadable"
        return f"it has no {CHECKPOINT_MARKER}: the run stopped while saving it"
    return manifest_problem(folder, marker.get("files"))


def good_checkpoints(output_dir: str | Path, *, report: bool = True) -> tuple[Path | None, list[Path]]:
    """``(newest checkpoint whose marker checks out, newer ones that do not)``.

    Older checkpoints are not checked: the newest good one is all resume needs.
    """
    out = Path(output_dir)
    if not out.is_dir():
        return None, []
    folders = [p for p in out.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir() and checkpoint_step(p) >= 0]
    bad: list[Path] = []
    for folder in sorted(folders, key=checkpoint_step, reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, bad
        if report:
            console.info(f"rahf: not resuming from {folder}: {problem}")
        bad.append(folder)
    return None, bad


def check_finite(loss: torch.Tensor, trainer: Trainer, stage: str) -> None:
    """Stop the run at the first NaN/inf loss, keeping the last good checkpoint on disk."""
    if not torch.isfinite(loss.detach()).all():
        step = trainer.state.global_step + 1
        last, _ = good_checkpoints(trainer.args.output_dir, report=False)
        where = f"; last good checkpoint: {last}" if last else "; no checkpoint was saved yet"
        raise TrainingError(
            f"{stage}: loss became {float(loss.detach().float().mean())} at step {step}{where}"
            " (a lower learning rate usually helps; a changed config needs a new --run-dir or --overwrite)"
        )


class LossLogCallback(TrainerCallback):
    """Collect the training log so each stage can write metrics.jsonl and a loss curve.

    At the end the records are rebuilt from the Trainer's ``log_history``, which a resumed run
    restores from its checkpoint: the log then covers the steps before the interruption too.
    """

    def __init__(self) -> None:
        self.records: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and math.isfinite(logs["loss"]):
            self.records.append({"step": state.global_step, **logs})

    def on_train_end(self, args, state, control, **kwargs):
        history = [r for r in state.log_history if "loss" in r and math.isfinite(r["loss"])]
        if history:
            self.records = [{"step": r["step"], **{k: v for k, v in r.items() if k != "step"}} for r in history]


def _stage_dir(args: TrainingArguments) -> str:
    """The stage a Trainer works for, from its output folder ``RUN_DIR/<stage>/checkpoints``."""
    return Path(args.output_dir).parent.name


def _format_value(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class StageProgress(TrainerCallback):
    """One progress bar per training stage, named after it, with the latest loss on it.

    Replaces the Trainer's own bar, which prints every log dict between bar redraws. With
    ``--verbose`` each logged step is also written as one line (``step 5/20  loss 0.0106 ...``);
    with ``--quiet`` there is no bar. Only the main process draws.
    """

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and not console.is_quiet():
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=state.max_steps, initial=state.global_step, desc=self.stage, unit="step",
                dynamic_ncols=True, file=sys.stderr,
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        if "loss" in logs:
            self.bar.set_postfix(loss=_format_value(logs["loss"]), refresh=False)
        elif "train_loss" in logs and not self.bar.postfix:  # fewer steps than logging_steps
            self.bar.set_postfix(mean_loss=_format_value(logs["train_loss"]), refresh=True)
        if console.is_verbose():
            values = "  ".join(f"{k} {_format_value(v)}" for k, v in logs.items())
            self.bar.write(f"{self.stage} step {state.global_step}/{state.max_steps}  {values}", file=sys.stderr)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def use_stage_progress(trainer: Trainer) -> None:
    """Swap the Trainer's bar and log printer for :class:`StageProgress`."""
    for callback in (ProgressCallback, PrinterCallback, StageProgress):  # StageProgress: a rerun's
        trainer.remove_callback(callback)
    trainer.add_callback(StageProgress(getattr(trainer, "stage", None) or _stage_dir(trainer.args)))


class CheckpointMarker(TrainerCallback):
    """Write :data:`CHECKPOINT_MARKER` into each checkpoint once the Trainer has saved all of it.

    ``on_save`` runs after the weights, optimizer, scheduler, RNG and trainer state are written,
    so a marker proves the checkpoint whole. Ranks write their own RNG files: wait for all first.
    """

    def on_save(self, args, state, control, **kwargs):
        wait_for_everyone()
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if args.should_save and is_main_process() and folder.is_dir():
            files = folder_manifest(folder, hash_limit=HASH_LIMIT)
            files.pop(CHECKPOINT_MARKER, None)
            atomic_write_json(folder / CHECKPOINT_MARKER, {"step": state.global_step, "files": files})


class StopOnSignal(TrainerCallback):
    """SIGTERM / SIGINT: finish the current step, save a checkpoint, stop training.

    The handler only records the signal (printing from a handler can collide with tqdm's
    writes); the callback acts at the next step end. A second signal stops at once. In a
    distributed run the ranks agree at every step end on whether any of them got one, so all
    stop after the same step even when the launcher's SIGTERM reaches them a moment apart.
    """

    def __init__(self) -> None:
        self.signum: int | None = None  # received here, or by another rank
        self.received = False  # this process got a signal itself
        self.announced = False
        self.previous: dict[int, object] = {}  # handlers to fall back on for a second signal

    def request(self, signum: int, frame) -> None:
        if self.received:
            fallback = self.previous.get(signum)
            if callable(fallback):
                fallback(signum, frame)
            raise KeyboardInterrupt
        self.received = True
        self.signum = self.signum or signum

    def on_step_end(self, args, state, control, **kwargs):
        fault_point(f"step:{_stage_dir(args)}:{state.global_step}")
        agreed = _agreed_signal(self.signum, args.device)
        if agreed is not None:
            self.signum = self.signum or agreed
            if not self.announced:
                from tqdm.auto import tqdm

                name = signal.Signals(self.signum).name
                tqdm.write(f"rahf: {name} received: saving a checkpoint at step {state.global_step} and stopping"
                           " (send it again to stop at once)", file=sys.stderr)
                self.announced = True
            control.should_save = True
            control.should_training_stop = True
        return control


def _agreed_signal(signum: int | None, device) -> int | None:
    """The signal any rank got, on every rank (itself outside a distributed run): ranks that
    stopped after different steps would wait for each other in their next collective forever."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return signum
    flag = torch.tensor([signum or 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None


class SamplerEpoch(TrainerCallback):
    """Tell the data sampler the epoch at every epoch start, wherever the loader wrappers put it.

    Under DDP, accelerate's ``DataLoaderShard.set_epoch`` does not reach a sampler inside
    ``BatchSamplerShard`` once ``skip_first_batches`` has wrapped the loader for a resume
    (accelerate 1.15): a 2-process run resumed mid-epoch drew epoch 0's order and ended with
    another adapter (tests/reliability/test_multiprocess_resume.py).
    """

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        epoch, todo, seen = math.floor(state.epoch or 0), [train_dataloader], set()
        while todo:
            node = todo.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if callable(getattr(node, "set_epoch", None)):
                node.set_epoch(epoch)
            todo += [getattr(node, name, None) for name in ("batch_sampler", "sampler")]


@contextlib.contextmanager
def _handle_signals(stop: StopOnSignal) -> Iterator[None]:
    """Route SIGTERM and SIGINT to ``stop`` for the block (main thread only: Python's rule)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, stop.request) for sig in (signal.SIGTERM, signal.SIGINT)}
    stop.previous = previous
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _disk_full(err: BaseException, folder: Path) -> bool:
    """torch.save reports a full disk as a RuntimeError ("unexpected pos ..."); tell it apart."""
    text = str(err)
    if "No space left" in text:
        return True
    probe = folder if folder.exists() else folder.parent
    try:
        return shutil.disk_usage(probe).free < (64 << 20) and ("write" in text or "pos" in text)
    except OSError:
        return False


def _finished(checkpoint: Path, max_steps: int = -1) -> bool:
    """Whether a checkpoint was saved at the last step its run planned, and (``max_steps`` > 0)
    holds at least that many steps: a stage trained on in chunks resumes from an earlier end."""
    state = read_marker(checkpoint / "trainer_state.json") or {}
    done = isinstance(state.get("max_steps"), int) and state.get("global_step", -1) >= state["max_steps"] > 0
    return done and (max_steps <= 0 or state["global_step"] >= max_steps)


def train_resumably(trainer: Trainer) -> None:
    """Train, resuming from the newest complete checkpoint in the output folder if there is one.

    Checkpoints newer than that one (cut off mid-save, or damaged) are reported and removed, so
    the Trainer rewrites them. SIGTERM / SIGINT end the run at a step boundary with a checkpoint
    and :class:`TrainingInterrupted`. A fresh start reseeds, so it begins from the same RNG state
    whatever ran earlier in the process (a resumed run restores the checkpoint's RNG state).
    """
    out = Path(trainer.args.output_dir)
    last, bad = good_checkpoints(out)
    wait_for_everyone()  # every rank has judged the checkpoints before rank 0 removes any
    if is_main_process():
        for folder in bad:
            shutil.rmtree(folder, ignore_errors=True)
    wait_for_everyone()
    if last:
        note = f" (newest complete checkpoint; {len(bad)} newer one(s) removed)" if bad else ""
        console.info(f"rahf: resuming from {last}{note}")
    elif bad:
        console.info(f"rahf: no complete checkpoint in {out}; starting this stage from the beginning")
    if last and _finished(last, trainer.args.max_steps):
        # transformers 5.24 resumed at global_step == max_steps trains one step more when
        # max_steps ends mid-epoch; the checkpoint already holds the final weights: load them.
        console.info(f"rahf: {last} holds the last step of this stage; loading it")
        trainer._load_from_checkpoint(str(last))  # what train() does on resume
        trainer.state = TrainerState.load_from_json(str(last / "trainer_state.json"))
        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, LossLogCallback):
                callback.on_train_end(trainer.args, trainer.state, trainer.control)
        return
    stop = StopOnSignal()
    trainer.add_callback(CheckpointMarker())
    trainer.add_callback(SamplerEpoch())
    trainer.add_callback(stop)
    use_stage_progress(trainer)
    set_seed(trainer.args.seed)
    try:
        with _handle_signals(stop):
            trainer.train(resume_from_checkpoint=str(last) if last else None)
    except RuntimeError as err:
        if not isinstance(err, TrainingError) and _disk_full(err, out):
            raise OSError(errno.ENOSPC, "No space left on device (while saving a checkpoint)", str(out)) from err
        raise
    if stop.signum is not None:
        step = trainer.state.global_step
        saved = out / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        stage = getattr(trainer, "stage", _stage_dir(trainer.args))
        raise TrainingInterrupted(
            f"{stage}: stopped by {signal.Signals(stop.signum).name} after step {step}; checkpoint saved in {saved}."
            " Rerun the same command to resume from it",
            stop.signum,
        )


class GuardedTrainer(Trainer):
    """``Trainer`` that stops on a non-finite loss. Subclasses override :meth:`stage_loss`."""

    stage = "train"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Every stage loss is a mean over its micro-batch: the Trainer must average them over
        # gradient accumulation. It skips that when the model's forward takes **kwargs, assuming
        # the loss was normalised by ``num_items_in_batch`` -- which stage losses never receive.
        self.model_accepts_loss_kwargs = False

    def stage_loss(self, model, inputs: dict) -> torch.Tensor:
        return super().compute_loss(model, inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = poisoned(self.stage_loss(model, inputs), f"loss:{_stage_dir(self.args)}:{self.state.global_step + 1}")
        check_finite(loss, self, self.stage)
        return loss

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if _internal_call:  # a checkpoint: weights written, optimizer / RNG / state not yet
            fault_point(f"save:{_stage_dir(self.args)}:{self.state.global_step}", output_dir)


def _sort_target_modules(config_path: Path) -> None:
    """PEFT writes ``target_modules`` from a set, in an order that changes with each process's
    string hashing; sorted, the same adapter gives the same bytes, so a stage redone after a
    fault is recognised as unchanged and later stages are kept."""
    import json

    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_trained(model, out: Path, *, merged: bool, tokenizer=None) -> None:
    """Write the adapter (``out/adapter``) or full weights (``out/model``) atomically.

    With ``merged`` a LoRA model is also written merged into its base (``out/merged``), for the
    layouts that need plain weights.
    """
    from rahf.io import atomic_dir

    if isinstance(model, PeftModel):
        def build_adapter(tmp: Path) -> None:
            model.save_pretrained(tmp, selected_adapters=["default"])
            _sort_target_modules(tmp / "adapter_config.json")

        atomic_dir(out / "adapter", build_adapter)
        if merged:
            def build(tmp: Path) -> None:
                model.merge_and_unload().save_pretrained(tmp)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)

            atomic_dir(out / "merged", build)
    else:
        def build_full(tmp: Path) -> None:
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)

        atomic_dir(out / ("merged" if merged else "model"), build_full)
