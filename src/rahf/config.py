"""Configuration: one dataclass per stage, loaded by :mod:`rahf.config_loader` (YAML, ``--set``, flags).

Defaults follow the RAHF paper's reference settings (see ``docs`` in README) except where noted.
Every check that can run before loading a model runs in ``__post_init__``; the checks that need
the model's depth run in :func:`check_against_model`. Errors name the key and say how to fix it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml

from rahf.config_loader import ConfigError, file_layer, load, read_yaml, set_layers
from rahf.instructions import DISPREFERRED_INSTRUCTION, PREFERRED_INSTRUCTION

C = TypeVar("C", bound="RunConfig")  # the config class load_config builds
# TRL DPOConfig.loss_type values offered for DPO and Dual step 1: the paired losses on the
# chosen-minus-rejected log-ratio (sigmoid_norm: per-token means instead of sums).
DpoLoss = Literal["sigmoid", "sigmoid_norm", "ipo", "hinge", "robust"]


def _non_negative(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a number >= 0, got {value!r}")


def _positive(name: str, value: float | int | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")


@dataclass
class LoraSettings:
    r: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: float = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata={"help": "module names to adapt, or ['all-linear']"},
    )

    def check(self, prefix: str) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"{prefix}.r (LoRA rank) must be an integer >= 1, got {self.r!r}")
        _positive(f"{prefix}.alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{prefix}.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise ConfigError(f"{prefix}.target_modules must name at least one module")


@dataclass
class TrainSettings:
    """Optimisation budget of one stage. ``max_steps`` > 0 overrides ``epochs``."""

    learning_rate: float = field(default=2e-4, metadata={"help": "peak learning rate (AdamW)"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the stage's examples"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; > 0 overrides epochs"})
    batch_size: int = field(default=4, metadata={"help": "examples per device per step"})
    grad_accum: int = field(default=1, metadata={"help": "gradient accumulation steps"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "share of steps with linear warm-up"})
    lr_scheduler: str = field(
        default="constant_with_warmup", metadata={"help": "any transformers scheduler name (cosine, linear, ...)"}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})

    def check(self, prefix: str) -> None:
        _positive(f"{prefix}.learning_rate", self.learning_rate)
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"{prefix}.max_steps must be >= 1 (or -1 to use epochs), got {self.max_steps}")
        if self.max_steps == -1:
            _positive(f"{prefix}.epochs", self.epochs)
        for name in ("batch_size", "grad_accum"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{prefix}.{name} must be an integer >= 1, got {value!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"{prefix}.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


@dataclass
class Step1Config:
    """Step 1: teach the model what is preferred (SCIT: one model; Dual: two adapters)."""

    train: TrainSettings = field(
        default_factory=lambda: TrainSettings(learning_rate=2e-4, epochs=2.0, warmup_ratio=0.1)
    )
    lora: LoraSettings = field(
        default_factory=lambda: LoraSettings(r=16, alpha=32, target_modules=["all-linear"])
    )
    full_finetune: bool = field(default=False, metadata={"help": "train all weights instead of LoRA"})
    label_smoothing: float = field(
        default=0.2, metadata={"help": "SCIT contrastive term's epsilon (docs/method.md, step 1a)"}
    )
    dual_storage: Literal["adapters", "full-copies"] = field(
        default="adapters",
        metadata={"help": "Dual: two LoRA adapters on one base, or two merged full copies (reference layout)"},
    )
    objective: Literal["sft", "preference"] = field(
        default="sft",
        metadata={"help": "Dual: sft (paper: each side imitates its replies) or preference (DPO: chosen over rejected for M+, swapped for M-)"},
    )
    beta: float = field(default=0.1, metadata={"help": "DPO temperature of step1.objective=preference"})
    loss_type: DpoLoss = field(
        default="sigmoid",
        metadata={"help": "step1.objective=preference: TRL's DPO loss; sigmoid_norm compares per-token means, so a longer reply carries no more weight than a short one (raise step1.beta: its scale is per token)"},
    )
    sft_weight: float = field(
        default=0.0,
        metadata={"help": "step1.objective=preference: add this x the mean NLL of the side's preferred reply (chosen for M+, rejected for M-; RPO), so each side also imitates its replies as the paper's SFT does"},
    )
    shared_length: bool = field(
        default=False,
        metadata={"help": "step1.objective=preference: compare chosen and rejected over their shared length, without the end-of-reply token, so step 1 learns what the replies say rather than which is longer or stops first"},
    )
    readiness_pairs: int = field(
        default=64, metadata={"help": "held-out pairs scored after step 1 to check it separates preferred from dispreferred; 0 skips"}
    )
    until_separated: bool = field(
        default=False, metadata={"help": "train step 1 on in chunks until the readiness CI's lower bound clears 0"}
    )
    chunk_steps: int = field(default=20, metadata={"help": "until_separated: steps added per chunk"})
    max_steps_cap: int = field(default=200, metadata={"help": "until_separated: most step-1 steps in all"})
    on_not_separated: Literal["continue", "stop"] = field(
        default="continue", metadata={"help": "until_separated: at the cap without separation, fit anyway or stop the run"}
    )

    def check(self) -> None:
        self.train.check("step1.train")
        self.lora.check("step1.lora")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"step1.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        _positive("step1.beta", self.beta)
        _non_negative("step1.sft_weight", self.sft_weight)
        for name in ("readiness_pairs", "chunk_steps", "max_steps_cap"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "readiness_pairs" else 1):
                raise ConfigError(f"step1.{name} must be an integer >= {0 if name == 'readiness_pairs' else 1}, got {value!r}")
        if self.until_separated and self.readiness_pairs == 0:
            raise ConfigError("step1.until_separated needs step1.readiness_pairs > 0 (the pairs it measures on)")


@dataclass
class PatternConfig:
    """Step 2: which layers and replies the activity patterns are read from."""

    target_layers: list[int] | None = field(
        default=None,
        metadata={"help": "hidden_states indices (1..N, after block l); default: every other layer over the middle third"},
    )
    scan: str | None = field(
        default=None,
        metadata={"help": "a `rahf scan` scan.json: its recommended target layers, used when target_layers is not set"},
    )
    alpha: float = field(default=5.0, metadata={"help": "target = orig + alpha * (preferred - dispreferred)"})
    reply: Literal["default", "random", "chosen", "rejected", "both"] = field(
        default="default",
        metadata={"help": "reply the patterns use; default: random for SCIT, both for Dual"},
    )
    disjoint_share: float = field(
        default=0.5,
        metadata={"help": "share of training prompts whose pairs feed only steps 2-3; the rest train step 1 (split by prompt hash); 0: all feed both"},
    )
    align_target: Literal["base", "preferred"] = field(
        default="base",
        metadata={"help": "Dual: align the original model, or M+ (reference code: A_o and the fit input then carry I+)"},
    )

    def check(self) -> None:
        if not 0 <= self.disjoint_share < 1:
            raise ConfigError(f"patterns.disjoint_share must be in [0, 1), got {self.disjoint_share}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ConfigError(f"patterns.alpha must be a finite number, got {self.alpha!r}")
        if self.alpha < 0:
            raise ConfigError(f"patterns.alpha must be >= 0 (it scales the preference direction), got {self.alpha}")
        if self.target_layers is not None:
            if not self.target_layers or not all(isinstance(i, int) for i in self.target_layers):
                raise ConfigError("patterns.target_layers must be a non-empty list of integers")


@dataclass
class FitConfig:
    """Step 3: LoRA fitted so hidden states match the targets."""

    train: TrainSettings = field(default_factory=lambda: TrainSettings(learning_rate=3e-4, epochs=1.0))
    lora: LoraSettings = field(default_factory=LoraSettings)
    kl_weight: float = field(default=0.0, metadata={"help": "weight of KL(frozen || trained) next-token term"})
    stop_weight: float = field(
        default=0.0,
        metadata={"help": "weight of KL(frozen || trained) of the end-or-continue choice at each reply token: the fit may change what the model says, not when it stops (length control)"},
    )
    anchor_weight: float = field(
        default=0.0,
        metadata={"help": "weight of KL(frozen || trained) next-token term on the frozen model's own greedy replies to the fit's prompts (on-policy: holds length and style where generation goes; generates one reply per prompt)"},
    )
    targets: Literal["on-the-fly", "cached"] = field(
        default="on-the-fly", metadata={"help": "compute targets per batch, or once and cache on disk"}
    )
    truncate_forward: bool = field(
        default=True, metadata={"help": "stop forward passes at the highest target layer"}
    )
    batch_frozen: bool = field(
        default=True, metadata={"help": "one batched frozen call for orig/preferred/dispreferred"}
    )
    cache_dtype: Literal["bfloat16", "float32"] = field(
        default="bfloat16", metadata={"help": "storage of cached targets (bf16 halves the disk and I/O)"}
    )
    group_by_length: bool = field(
        default=True, metadata={"help": "batch examples of similar length together to pad less"}
    )
    convergence_examples: int = field(
        default=8, metadata={"help": "validation examples on which each logged step reports the target share reached per layer; 0 skips"}
    )
    plateau_window: int = field(
        default=0, metadata={"help": "stop when the loss improved < plateau_threshold (relative) over this many logged steps; 0: off"}
    )
    plateau_threshold: float = field(default=0.01, metadata={"help": "relative loss improvement that counts as progress"})
    share_prompt: Literal["auto", "frozen", "all", "off"] = field(
        default="auto",
        metadata={"help": "run a prompt both replies of a pair share once per model: frozen = in the frozen passes; all = the trained pass too (faster on long prompts, slower on short; not with kl_weight or gradient checkpointing); auto = frozen, and the trained pass in batches where it skips > 25% of the positions; off = never"},
    )

    def check(self) -> None:
        self.train.check("fit.train")
        self.lora.check("fit.lora")
        for name in ("convergence_examples", "plateau_window"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"fit.{name} must be an integer >= 0, got {value!r}")
        if not math.isfinite(self.plateau_threshold) or self.plateau_threshold < 0:
            raise ConfigError(f"fit.plateau_threshold must be >= 0, got {self.plateau_threshold}")
        for name in ("kl_weight", "stop_weight", "anchor_weight"):
            _non_negative(f"fit.{name}", getattr(self, name))


@dataclass
class RunConfig:
    """Settings every training command shares: what to train, on which data, in which windows,
    where to write, on which hardware, how to log. ``rahf align`` and ``rahf baseline`` extend it."""

    method: str = field(default="", metadata={"help": "the method this run trains"})
    model: str = field(default="smollm2", metadata={"help": "hub id, local folder, or 'smollm2'"})
    data: str = field(default="builtin", metadata={"help": "preference data file, folder, hub id, or 'builtin'"})
    data_format: Literal["auto", "hh", "plain", "conversational", "ultrafeedback"] = field(
        default="auto", metadata={"help": "preference data format; auto detects it from the first row"}
    )
    data_split: str | None = field(default=None, metadata={"help": "split of a hub dataset or saved DatasetDict"})
    data_columns: dict[str, str] | None = field(
        default=None,
        metadata={"help": "the file's column for each of prompt/chosen/rejected, e.g. {prompt: question, chosen: good} or 'prompt=question,chosen=good'"},
    )
    skip_invalid: bool = field(default=False, metadata={"help": "skip bad rows (counted by reason) instead of failing"})
    max_pairs: int | None = field(default=None, metadata={"help": "use at most this many training pairs"})
    validation_fraction: float = field(default=0.1, metadata={"help": "share of prompts held out (split by prompt hash)"})
    run_dir: str = field(default="runs/rahf", metadata={"help": "folder for every stage's outputs; reruns resume here"})
    seed: int = field(default=0, metadata={"help": "seed for splits, reply choice, LoRA init and data order"})
    max_prompt_tokens: int = field(default=256, metadata={"help": "prompt window; earliest turns are dropped first"})
    max_reply_tokens: int | None = field(
        default=None, metadata={"help": "reply window; default 64 for Dual, 512 for SCIT"}
    )
    dtype: Literal["auto", "float32", "bfloat16"] = field(
        default="auto", metadata={"help": "weights' dtype: auto = bf16 on a bf16 GPU, else fp32"}
    )
    mixed_precision: Literal["auto", "no", "bf16"] = field(
        default="auto",
        metadata={"help": "bf16 autocast with fp32 LoRA weights: auto = where bf16 is native (bf16 GPUs, CPUs with AVX-512 BF16/AMX) unless dtype is float32"},
    )
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1 ...; default cuda if available"})
    gradient_checkpointing: bool | Literal["auto"] = field(
        default="auto",
        metadata={"help": "recompute activations in the backward (less memory, ~10% slower): true, false, or auto = on only for a stage whose estimated peak exceeds memory_budget_gb"},
    )
    memory_budget_gb: float | None = field(
        default=None,
        metadata={"help": "memory a training stage may use (GB), for gradient_checkpointing auto; default: what the process holds plus what the device has free"},
    )
    report_to: list[str] = field(default_factory=lambda: ["none"], metadata={"help": "Trainer loggers: tensorboard, wandb, ..."})
    logging_steps: int = field(default=5, metadata={"help": "log the loss every N steps"})
    save_steps: int = field(default=50, metadata={"help": "checkpoint every N steps (resume point)"})

    # Keys of other commands: "prefix" -> the one-line message (``{key}``: the key given,
    # ``{rest}``: the key without the prefix). Read by rahf.config_loader.
    FOREIGN_KEYS: ClassVar[dict[str, str]] = {}
    DEFAULT_REPLY_WINDOW: ClassVar[int] = 64

    def __post_init__(self) -> None:
        if not 0 <= self.validation_fraction < 1:
            raise ConfigError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.max_pairs is not None and self.max_pairs < 1:
            raise ConfigError(f"max_pairs must be >= 1, got {self.max_pairs}")
        if self.max_prompt_tokens < 8:
            raise ConfigError(f"max_prompt_tokens must be >= 8, got {self.max_prompt_tokens}")
        if self.max_reply_tokens is not None and self.max_reply_tokens < 1:
            raise ConfigError(f"max_reply_tokens must be >= 1, got {self.max_reply_tokens}")
        if not isinstance(self.gradient_checkpointing, bool) and self.gradient_checkpointing != "auto":
            raise ConfigError(f"gradient_checkpointing must be true, false or auto, got {self.gradient_checkpointing!r}")
        _positive("memory_budget_gb", self.memory_budget_gb, allow_none=True)
        if self.data_columns is not None:  # normalised to a mapping, so config.yaml shows one
            from rahf.data.formats import parse_columns
            from rahf.data.schema import DataError

            try:
                self.data_columns = parse_columns(self.data_columns, name="data_columns") or None
            except DataError as err:
                raise ConfigError(str(err)) from None

    @property
    def reply_window(self) -> int:
        return self.max_reply_tokens if self.max_reply_tokens is not None else self.DEFAULT_REPLY_WINDOW

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        from rahf.io import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    def upgrade_saved(self, saved: dict[str, Any]) -> dict[str, Any]:
        """A run folder's saved config.json in this class's current shape, so a folder written
        by an older rahf still resumes (RunDir.check_config compares the two)."""
        return saved


_ALIGN_ONLY = "{key} belongs to `rahf align`, not `rahf baseline`"


@dataclass
class AlignConfig(RunConfig):
    """``rahf align``: the run settings plus RAHF's three steps (step1, patterns, fit)."""

    method: Literal["scit", "dual"] = field(default="dual", metadata={"help": "RAHF variant: scit (one model, contrastive instructions) or dual (preferred + dispreferred models)"})
    preferred_instruction: str = field(default=PREFERRED_INSTRUCTION, metadata={"help": "I+, placed as the system prompt"})
    dispreferred_instruction: str = field(default=DISPREFERRED_INSTRUCTION, metadata={"help": "I-, placed as the system prompt"})
    step1: Step1Config = field(default_factory=Step1Config)
    patterns: PatternConfig = field(default_factory=PatternConfig)
    fit: FitConfig = field(default_factory=FitConfig)

    FOREIGN_KEYS: ClassVar[dict[str, str]] = {
        "baseline": "{key} belongs to `rahf baseline` (there the key is `{rest}`); rahf align has no baseline settings",
    }

    def __post_init__(self) -> None:
        from rahf.method import METHODS

        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(repr(m) for m in METHODS)}, got {self.method!r}")
        super().__post_init__()
        if self.preferred_instruction.strip() == self.dispreferred_instruction.strip():
            raise ConfigError("preferred_instruction and dispreferred_instruction must differ")
        self.step1.check()
        self.patterns.check()
        if self.method == "scit" and (self.step1.objective != "sft" or self.patterns.align_target != "base"):
            raise ConfigError("step1.objective=preference and patterns.align_target=preferred are Dual options; use method=dual")
        if self.step1.shared_length and self.step1.objective != "preference":
            raise ConfigError("step1.shared_length cuts the pairs of step1.objective=preference; set that too (method=dual)")
        for key, default in (("loss_type", "sigmoid"), ("sft_weight", 0.0)):
            if getattr(self.step1, key) != default and self.step1.objective != "preference":
                raise ConfigError(f"step1.{key} shapes the DPO loss of step1.objective=preference; set that too (method=dual)")
        self.fit.check()

    @property
    def reply_window(self) -> int:
        from rahf.method import method_for

        return self.max_reply_tokens if self.max_reply_tokens is not None else method_for(self).reply_window

    @property
    def pattern_reply(self) -> str:
        from rahf.method import method_for

        return self.patterns.reply if self.patterns.reply != "default" else method_for(self).pattern_reply

    def upgrade_saved(self, saved: dict[str, Any]) -> dict[str, Any]:
        """Runs written before the baseline settings left AlignConfig saved a ``baseline`` section;
        runs written before ``fit.share_prompt`` shared the frozen passes only: they resume as ``frozen``;
        runs written before ``step1.shared_length``, ``step1.loss_type``, ``step1.sft_weight``, ``fit.stop_weight`` or ``fit.anchor_weight`` resume with
        them off, as they ran."""
        upgraded = {k: v for k, v in saved.items() if k != "baseline"}
        if isinstance(upgraded.get("fit"), dict):
            upgraded["fit"] = {"share_prompt": "frozen", "stop_weight": 0.0, "anchor_weight": 0.0, **upgraded["fit"]}
        if isinstance(upgraded.get("step1"), dict):
            upgraded["step1"] = {"shared_length": False, "loss_type": "sigmoid", "sft_weight": 0.0, **upgraded["step1"]}
        return upgraded


@dataclass
class BaselineConfig(RunConfig):
    """``rahf baseline sft|dpo``: the run settings plus the baseline's own training settings."""

    method: Literal["sft", "dpo"] = field(
        default="sft", metadata={"help": "sft (chosen replies, TRL SFTTrainer) or dpo (TRL DPOTrainer)"}
    )
    run_dir: str | None = field(default=None, metadata={"help": "folder for every stage's outputs; default runs/<method>"})
    max_reply_tokens: int | None = field(default=None, metadata={"help": "reply window; default 64"})
    train: TrainSettings = field(default_factory=lambda: TrainSettings(learning_rate=5e-4, epochs=1.0))
    lora: LoraSettings = field(
        default_factory=lambda: LoraSettings(r=16, alpha=32, target_modules=["all-linear"])
    )
    full_finetune: bool = field(default=False, metadata={"help": "train all weights instead of LoRA"})
    beta: float = field(default=0.1, metadata={"help": "DPO temperature of the implicit reward"})
    loss_type: DpoLoss = field(
        default="sigmoid",
        metadata={"help": "DPO: TRL's loss; sigmoid_norm compares per-token means of the log-ratios (raise beta: its scale is per token)"},
    )
    sft_weight: float = field(
        default=0.0, metadata={"help": "DPO: add this x the mean NLL of the chosen reply (RPO); 0 = plain DPO"}
    )
    precompute_ref_log_probs: bool = field(
        default=True, metadata={"help": "DPO: compute the reference log-probs once before training (when training reads every pair; else per batch)"}
    )
    shared_length: bool = field(
        default=False,
        metadata={"help": "DPO: compare chosen and rejected over their shared length, without the end-of-reply token (no reward for length or for stopping later)"},
    )

    FOREIGN_KEYS: ClassVar[dict[str, str]] = {
        **{name: _ALIGN_ONLY for name in ("step1", "patterns", "fit", "preferred_instruction", "dispreferred_instruction")},
    }

    # rahf <= 0.1 kept these settings under `baseline.` inside align's config; those keys still
    # read (baseline.train.learning_rate is train.learning_rate), and config.yaml shows the new ones.
    RENAMED_SECTIONS: ClassVar[dict[str, str]] = {"baseline": ""}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.run_dir is None:
            self.run_dir = f"runs/{self.method}"
        self.train.check("train")
        self.lora.check("lora")
        _positive("beta", self.beta)
        _non_negative("sft_weight", self.sft_weight)

    def upgrade_saved(self, saved: dict[str, Any]) -> dict[str, Any]:
        """Baseline runs written before this class existed saved align's config with a
        ``baseline`` section; they recorded no method (the command named it), so take ours. Runs
        written before ``shared_length``, ``loss_type`` or ``sft_weight`` resume with what they ran (off, sigmoid, 0)."""
        if "baseline" in saved:
            common = {f.name for f in dataclasses.fields(RunConfig)}
            saved = {k: v for k, v in saved.items() if k in common} | saved["baseline"] | {"method": self.method}
        return {"shared_length": False, "loss_type": "sigmoid", "sft_weight": 0.0, **saved}


def default_target_layers(num_layers: int) -> list[int]:
    """Every other hidden_states index over the middle third of the depth.

    The paper uses 10,12,...,20 of 32 blocks for a 7B Llama; this scales that band by depth.
    """
    lo = max(1, round(num_layers * 10 / 32))
    hi = max(lo, round(num_layers * 20 / 32))
    return list(range(lo, hi + 1, 2))


def scan_layers(path: str | None) -> list[int] | None:
    """The recommended target layers of a ``rahf scan`` result (``patterns.scan``)."""
    if not path:
        return None
    import json

    try:
        layers = json.loads(Path(path).read_text())["recommended"]["target_layers"]
    except OSError as err:
        raise ConfigError(f"patterns.scan: cannot read {path} ({err.strerror}); run `rahf scan` first") from err
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"patterns.scan: {path} has no recommended.target_layers; give a scan.json written by `rahf scan`") from err
    if not layers or not all(isinstance(i, int) for i in layers):
        raise ConfigError(f"patterns.scan: {path}: recommended.target_layers must be a non-empty list of integers")
    return list(layers)


def check_against_model(config: AlignConfig, num_layers: int) -> list[int]:
    """The target layers, validated against the model's depth."""
    layers = config.patterns.target_layers or scan_layers(config.patterns.scan) or default_target_layers(num_layers)
    bad = [i for i in layers if not 1 <= i <= num_layers]
    if bad:
        raise ConfigError(
            f"patterns.target_layers {bad} out of range for this model: it has {num_layers} blocks,"
            f" so valid hidden_states indices are 1..{num_layers}"
        )
    return sorted(set(layers))


# ---------------------------------------------------------------- loading (rahf.config_loader)


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, *, cls: type[C] = AlignConfig
) -> C:
    """``cls`` (default :class:`AlignConfig`) from defaults <- ``path`` (a YAML file or a
    packaged recipe name) <- ``key=value`` overrides."""
    layers = [file_layer(path)] if path is not None else []
    return load(cls, layers + set_layers(overrides or []))


def load_saved_config(path: str | Path) -> AlignConfig:
    """An align run folder's config.yaml; one written before the baseline settings left
    AlignConfig holds a ``baseline`` section, which no align stage reads: it is dropped."""
    data = {k: v for k, v in read_yaml(path).items() if k != "baseline"}
    return load(AlignConfig, [(str(path), data)])
