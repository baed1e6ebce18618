"""Gradient checkpointing chosen by a memory budget (``gradient_checkpointing: auto``).

Checkpointing keeps one hidden state per decoder block in the forward and runs each block again
in the backward: it lowers a stage's peak memory and costs time (the fit: 1331 against 1643 MB,
0.90x the throughput; BENCHMARKS.md). So ``auto`` turns it on only for a stage that would not fit
in ``memory_budget_gb`` without it. Each training stage's peak is estimated before it trains,
from what is known then:

- weights: the model's parameters x the bytes of the dtype they load in x the full copies the
  stage holds;
- trained state: LoRA parameters (or all of them, full fine-tuning) with their gradient and the
  two AdamW moments;
- activations: rows x (prompt + reply window) x hidden size x (blocks the gradient flows
  through x :data:`SAVED_BYTES_OFF` + :data:`TOKEN_BYTES`), bytes per token and unit of hidden
  size, measured; with checkpointing :data:`SAVED_BYTES_ON` per block instead;
- logits where the stage computes them: rows x positions x vocabulary x :data:`LOGIT_BYTES`;
- the fit's targets: the three roles' hidden states at the target layers, fp32.

Calibration: peak RSS (``VmHWM``) of the fit minus the RSS before its model loads, one process
per row (/tmp calibration script, not shipped), SCIT fit on the base weights, batch 4, every row
filled to the prompt + reply window, 3 steps, 1 thread, fp32 weights. "tiny" is
``rahf.testing.save_tiny(hidden=256, layers=16)`` (target layers 5,7,9), "smollm2" the embedded
SmolLM2-135M (target layers 9..19). The three byte factors are a least-squares fit to the eight
bf16-autocast rows; :data:`FP32_SCALE` comes from the two fp32 rows alone::

    model    window   autocast  checkpointing  measured MB  estimated MB
    tiny     256+64   bf16      off                  248.2         252.3   +2%
    tiny     256+64   bf16      on                   201.9         159.5  -21%
    tiny     512+128  bf16      off                  449.5         467.9   +4%
    tiny     512+128  bf16      on                   277.5         282.3   +2%
    smollm2  256+64   bf16      off                 1413.9        1361.1   -4%
    smollm2  256+64   bf16      on                   898.4         920.2   +2%
    smollm2  512+128  bf16      off                 2167.8        2209.1   +2%
    smollm2  512+128  bf16      on                  1334.3        1327.4   -1%
    smollm2  256+64   no        off                 1719.4        1719.9   +0%
    smollm2  256+64   no        on                   807.7         806.2   -0%

So the estimate without checkpointing, the one ``auto`` decides on, was within 4 % on both
models and windows. Only the fit was measured: the other stages (step 1, the baselines) use the
same factors plus their logits, unchecked; their per-token term, set by the fit's frozen passes,
likely overstates them. Weights in bf16 (a GPU's default) were not measured.

The estimate counts a stage's tensors, not the process around them (466-511 MB resident before
the model loaded in the rows above; a GPU's CUDA context is outside torch's count): a stated
budget is for the stage, and the default budget (what the process holds plus what is free)
counts the process in.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rahf.config import LoraSettings, RunConfig, TrainSettings

GB = 2**30

# Bytes per token and unit of hidden size, measured on the fit (fp32 weights, bf16 autocast; see
# the table above): saved for the backward in each block the gradient flows through, without and
# with checkpointing, and once per token outside the blocks (the no-grad passes of the frozen
# states, the batch, the loss).
SAVED_BYTES_OFF = 48
SAVED_BYTES_ON = 15
TOKEN_BYTES = 222
# Without bf16 autocast the activation term is scaled by these (fp32 weights; measured once, on
# SmolLM2 at 256+64); bf16 weights hold half of fp32's (not measured: no bf16-weight CPU run).
FP32_SCALE = {False: 1.45, True: 0.68}
LOGIT_BYTES = 12  # fp32 logits, their log-softmax and its gradient
ADAMW_STATE = 3  # a trained parameter's gradient and two moments, each the parameter's size


@dataclass(frozen=True)
class Architecture:
    """A model's sizes, read from its config without loading its weights."""

    params: int
    hidden: int
    layers: int
    vocab: int
    linears: tuple[tuple[int, str, int, int], ...]  # (block, module name, in features, out features)

    def lora_params(self, lora: LoraSettings, blocks: int | None = None) -> int:
        """Parameters of a LoRA adapter with ``lora``'s rank and targets, on the first ``blocks`` blocks."""
        targets = set(lora.target_modules)
        return sum(
            lora.r * (n_in + n_out)
            for block, name, n_in, n_out in self.linears
            if (blocks is None or block < blocks) and ("all-linear" in targets or name in targets)
        )


@functools.lru_cache(maxsize=8)
def architecture(path: str) -> Architecture:
    """The sizes of the model at ``path`` (a resolved model folder or hub id), built on the meta
    device: exact parameter counts at no memory cost."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rahf.hidden_states import decoder_blocks

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linears = tuple(
        (index, name.rsplit(".", 1)[-1], module.in_features, module.out_features)
        for index, block in enumerate(decoder_blocks(model))
        for name, module in block.named_modules()
        if isinstance(module, torch.nn.Linear)
    )
    text = config.get_text_config()
    return Architecture(
        params=sum(p.numel() for p in model.parameters()), hidden=text.hidden_size,
        layers=text.num_hidden_layers, vocab=text.vocab_size, linears=linears,
    )


@dataclass(frozen=True)
class Workload:
    """What one training stage holds and computes per micro-batch, from its settings."""

    rows: int  # sequences in one forward with gradients
    tokens: int  # positions per row: the prompt + reply window
    blocks: int  # decoder blocks the gradient flows through
    logit_positions: int  # positions per row whose logits are computed (0: none)
    trained_params: int  # LoRA parameters, or every parameter (full fine-tuning)
    full_finetune: bool = False
    copies: int = 1  # full copies of the weights held
    target_layers: int = 0  # the fit: layers whose target hidden states are held


@dataclass(frozen=True)
class Estimate:
    """A stage's estimated peak, in bytes, by part."""

    weights: int
    trained: int
    activations: int
    logits: int
    targets: int

    @property
    def total(self) -> int:
        return self.weights + self.trained + self.activations + self.logits + self.targets


def estimate(
    arch: Architecture, work: Workload, *, weight_bytes: int, checkpointing: bool, autocast: bool = True
) -> Estimate:
    """The peak of ``work`` on ``arch`` with weights of ``weight_bytes`` each, under bf16
    ``autocast`` or not (see the module's docstring for each term and its calibration)."""
    measured = weight_bytes == 4 and autocast  # the setting the factors were measured in
    scale = 1.0 if measured else FP32_SCALE[checkpointing] * weight_bytes / 4
    per_block = SAVED_BYTES_ON if checkpointing else SAVED_BYTES_OFF
    row_tokens = work.rows * work.tokens
    trained_bytes = weight_bytes if work.full_finetune else 4  # LoRA weights train in fp32
    return Estimate(
        weights=arch.params * weight_bytes * work.copies,
        trained=work.trained_params * trained_bytes * (ADAMW_STATE + (0 if work.full_finetune else 1)),
        activations=int(row_tokens * arch.hidden * (work.blocks * per_block + TOKEN_BYTES) * scale),
        logits=work.rows * work.logit_positions * arch.vocab * LOGIT_BYTES,
        targets=3 * row_tokens * work.target_layers * arch.hidden * 4,
    )


def stage_workload(config: RunConfig, train: TrainSettings, stage: str, arch: Architecture) -> Workload:
    """The workload of the training stage ``stage`` (the name ``training_arguments`` gets)."""
    from rahf.config import AlignConfig, check_against_model

    tokens = config.max_prompt_tokens + config.reply_window
    reply = config.reply_window
    rows = train.batch_size
    if isinstance(config, AlignConfig) and stage == "fit":
        layers = check_against_model(config, arch.layers)
        grad_all = not config.fit.truncate_forward or config.fit.kl_weight > 0
        blocks = arch.layers if grad_all else max(layers)
        dual_copies = config.method == "dual" and (config.step1.dual_storage == "full-copies" or config.step1.full_finetune)
        copies = 1 + (2 if dual_copies else 0) + (1 if config.patterns.align_target == "preferred" and not dual_copies else 0)
        return Workload(rows, tokens, blocks, reply if config.fit.kl_weight > 0 else 0,
                        arch.lora_params(config.fit.lora, max(layers)), copies=copies, target_layers=len(layers))
    if isinstance(config, AlignConfig) and stage.startswith("step1"):
        step1 = config.step1
        pairs_of_rows = stage == "step1-scit" or step1.objective == "preference"  # both replies / instructions
        return _trained(Workload(2 * rows if pairs_of_rows else rows, tokens, arch.layers, reply, 0),
                        arch, step1.lora, step1.full_finetune)
    # baselines (TRL computes the logits at every position) and anything else: a full forward
    lora = getattr(config, "lora", None)
    full = bool(getattr(config, "full_finetune", False)) or lora is None
    return _trained(Workload(2 * rows if stage == "dpo" else rows, tokens, arch.layers, tokens, 0), arch, lora, full)


def _trained(work: Workload, arch: Architecture, lora: LoraSettings | None, full: bool) -> Workload:
    trained = arch.params if full or lora is None else arch.lora_params(lora)
    return dataclasses.replace(work, trained_params=trained, full_finetune=full)


def device_budget(device: str) -> tuple[int, str]:
    """``(bytes, where from)`` when no budget is stated: what this process holds on ``device``
    plus what is free there. On CPU the available RAM is shared by the processes that one
    ``accelerate launch`` starts on this machine (``LOCAL_WORLD_SIZE``)."""
    import torch

    if device.startswith("cuda"):
        index = torch.device(device)
        free, _total = torch.cuda.mem_get_info(index)
        return free + torch.cuda.memory_reserved(index), "free GPU memory + this process's"
    import psutil

    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    available = psutil.virtual_memory().available // ranks
    share = f" / {ranks} processes" if ranks > 1 else ""
    return available + psutil.Process().memory_info().rss, f"available RAM{share} + this process's"


@dataclass(frozen=True)
class CheckpointingChoice:
    """Whether a stage trains with gradient checkpointing, and why."""

    stage: str
    setting: bool | str  # gradient_checkpointing as configured
    enabled: bool
    without_gb: float | None = None  # estimated peak without checkpointing
    with_gb: float | None = None  # estimated peak with it
    budget_gb: float | None = None
    budget_from: str = ""

    def line(self) -> str:
        state = "on" if self.enabled else "off"
        if self.setting != "auto":
            return f"rahf: {self.stage}: gradient checkpointing {state} (gradient_checkpointing: {str(self.setting).lower()})"
        if self.without_gb is None:
            return f"rahf: {self.stage}: gradient checkpointing {state} (auto; {self.budget_from})"
        over = "; over the budget even with it" if self.with_gb is not None and self.with_gb > (self.budget_gb or 0) else ""
        return (
            f"rahf: {self.stage}: gradient checkpointing {state} (auto): estimated peak {self.without_gb:.3g} GB"
            f" without it, {self.with_gb:.3g} GB with it; budget {self.budget_gb:.3g} GB ({self.budget_from}){over}"
        )

    def record(self) -> dict:
        return dataclasses.asdict(self)


def choose_checkpointing(config: RunConfig, train: TrainSettings, stage: str) -> CheckpointingChoice:
    """``gradient_checkpointing`` for one stage: as configured when true or false; with ``auto``,
    on only when the stage's estimated peak without it exceeds the budget (off is faster)."""
    setting = config.gradient_checkpointing
    if setting != "auto":
        return CheckpointingChoice(stage, setting, bool(setting))
    from rahf.models import default_device, resolve_model_path, torch_dtype
    from rahf.trainer import use_bf16

    device = config.device or default_device()
    try:
        arch = architecture(resolve_model_path(config.model))
    except ValueError as err:  # no decoder blocks rahf can find: train as before, without it
        return CheckpointingChoice(stage, setting, False, budget_from=f"no estimate: {err}")
    work = stage_workload(config, train, stage, arch)
    weight_bytes = torch_dtype(config.dtype, device).itemsize
    autocast = use_bf16(config)
    without, with_ = (estimate(arch, work, weight_bytes=weight_bytes, checkpointing=c, autocast=autocast).total
                      for c in (False, True))
    if config.memory_budget_gb is not None:
        budget, source = int(config.memory_budget_gb * GB), "memory_budget_gb"
    else:
        budget, source = device_budget(device)
    return CheckpointingChoice(
        stage, setting, without > budget, without / GB, with_ / GB, budget / GB, source,
    )
