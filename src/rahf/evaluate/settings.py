"""The configs of ``rahf eval`` and ``rahf train-rm``, in a module light enough to import when
the CLI builds its flags from them (rahf.config_loader); the code that runs them imports torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from rahf.config import ConfigError
from rahf.data.formats import parse_columns
from rahf.evaluate.stats import DEFAULT_RESAMPLES

Method = Literal["lora", "head-only"]


@dataclass
class EvalConfig:
    """Everything ``rahf eval`` needs; saved verbatim under ``settings`` in report.json."""

    model: str = field(metadata={"help": "model to evaluate: 'smollm2', folder, hub id or adapter folder"})
    out: str = field(default="eval", metadata={"help": "folder for report.json, report.md, PNGs"})
    baseline: str | None = field(default=None, metadata={"help": "model to compare against"})
    reference: str | None = field(default=None, metadata={"help": "reference for DPO implicit rewards"})
    pairs: list[str] = field(default_factory=list, metadata={"help": "preference data files"})
    prompts: list[str] = field(default_factory=list, metadata={"help": "prompt files to generate on"})
    harmful_prompts: list[str] = field(
        default_factory=list, metadata={"help": "prompt files whose prompts are all harmful requests"}
    )
    reward_model: str | None = field(default=None, metadata={"help": "sequence-classification RM"})
    limit: int | None = field(default=None, metadata={"help": "first N pairs / prompts per file"})
    skip_invalid: bool = field(default=True, metadata={"help": "skip and count invalid pair rows"})
    columns: dict[str, str] | None = field(
        default=None, metadata={"help": "pairs files' column names: 'prompt=question,chosen=good,rejected=bad'"}
    )
    max_new_tokens: int = field(default=128, metadata={"help": "most tokens generated per reply"})
    do_sample: bool = field(default=False, metadata={"help": "sample instead of greedy decoding"})
    temperature: float = field(default=1.0, metadata={"help": "with do_sample"})
    top_p: float = field(default=1.0, metadata={"help": "with do_sample"})
    instruction: str | None = field(
        default=None, metadata={"help": "system prompt given to the evaluated model (not the baseline) when scoring"
                                        " pairs and generating: the prompting baseline"}
    )
    steer: str | None = field(
        default=None, metadata={"help": "steering vector file (rahf scan / compose, or a llama.cpp control-vector"
                                        " .gguf) added to the evaluated model (not the baseline) while scoring and"
                                        " generating"}
    )
    steer_strength: float | None = field(
        default=None, metadata={"help": "with steer: multiples of the vector as read (default: the file's)"}
    )
    steer_layers: str | None = field(
        default=None, metadata={"help": "with steer: hidden_states indices, e.g. '11,13,15' (default: the file's)"}
    )
    batch_size: int = field(default=8, metadata={"help": "pairs / prompts per forward pass"})
    max_prompt_tokens: int = field(default=256, metadata={"help": "prompt window; earliest turns are dropped first"})
    max_reply_tokens: int = field(default=256, metadata={"help": "reply tokens scored per pair"})
    seed: int = field(default=0, metadata={"help": "seed of sampling and the bootstrap"})
    resamples: int = field(default=DEFAULT_RESAMPLES, metadata={"help": "bootstrap resamples"})
    cache: bool = field(default=True, metadata={"help": "reuse generations and the RM's pair scores from the disk cache"})
    cache_dir: str | None = field(default=None, metadata={"help": "default: <rahf cache>/generations"})
    device: str | None = field(default=None, metadata={"help": "cuda, cpu, ... (default: cuda if available)"})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={"help": "weights' dtype"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("--model is required (a model name, folder or hub id)")
        if not (self.pairs or self.prompts or self.harmful_prompts):
            raise ConfigError("nothing to evaluate: give --pairs FILE and/or --prompts FILE")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be >= 1, got {self.limit}")
        for name in ("max_new_tokens", "batch_size", "max_reply_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_prompt_tokens < 8:
            raise ConfigError(f"max_prompt_tokens must be >= 8, got {self.max_prompt_tokens}")
        if self.do_sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ConfigError("sampling needs temperature > 0 and 0 < top_p <= 1")
        if self.resamples < 0:
            raise ConfigError(f"resamples must be >= 0, got {self.resamples}")
        self.columns = parse_columns(self.columns) or None  # bad syntax fails before models load
        if (self.steer_strength is not None or self.steer_layers) and not self.steer:
            raise ConfigError("--strength / --layers steer a model: give --steer FILE too")

    def treatment(self, role: str) -> dict[str, Any]:
        """What the evaluated model gets on top of its weights (the baseline gets nothing)."""
        if role != "model":
            return {"instruction": None, "steer": None}
        return {"instruction": self.instruction, "steer": self.steer}


@dataclass
class RewardModelConfig:
    """Settings of one reward-model training run (saved into metrics.json)."""

    data: str = field(metadata={"help": "preference data: file, folder, hub id or 'builtin'"})
    out: str = field(metadata={"help": "folder to write the reward model and metrics.json to"})
    model: str = field(default="smollm2", metadata={"help": "backbone: hub id, folder or 'smollm2'"})
    method: Method = field(default="lora", metadata={"help": "lora (+ score head) or head-only"})
    data_format: str = "auto"
    skip_invalid: bool = field(default=True, metadata={"help": "skip (and count) invalid rows"})
    columns: str | dict[str, str] | None = field(
        default=None, metadata={"help": "the data's column names: 'prompt=question,chosen=good,rejected=bad'"}
    )
    limit: int | None = field(default=None, metadata={"help": "use the first N valid pairs"})
    validation_fraction: float = 0.1
    epochs: float = 1.0
    max_steps: int = field(default=-1, metadata={"help": "> 0 overrides epochs"})
    learning_rate: float | None = field(
        default=None, metadata={"help": "default 2e-4 for lora, 1e-3 for head-only"}
    )
    batch_size: int = 8
    grad_accum: int = 1
    lora_r: int = 16
    lora_alpha: int = 32
    lora_layers: int | None = field(
        default=None,
        metadata={"help": "LoRA only in the top N decoder blocks (backward stops there; faster)"},
    )
    max_length: int = 512
    max_reply_tokens: int = 256
    seed: int = 0
    resamples: int = DEFAULT_RESAMPLES
    progress: bool = True

    def __post_init__(self) -> None:
        if self.method not in ("lora", "head-only"):
            raise ConfigError(f"method must be 'lora' or 'head-only', got {self.method!r}")
        if not 0 < self.validation_fraction < 1:
            raise ConfigError(
                f"validation fraction must be in (0, 1) to measure held-out accuracy, got {self.validation_fraction}"
            )
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"max_steps must be >= 1 (or -1 to use epochs), got {self.max_steps}")
        if self.limit is not None and self.limit < 2:
            raise ConfigError(f"limit must be >= 2 pairs, got {self.limit}")
        for name in ("batch_size", "grad_accum", "lora_r", "lora_alpha", "max_reply_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lora_layers is not None and self.lora_layers < 1:
            raise ConfigError(f"lora_layers must be >= 1 (or unset for all blocks), got {self.lora_layers}")
        if self.max_length < 16:
            raise ConfigError(f"max_length must be >= 16 tokens, got {self.max_length}")

    @property
    def lr(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 2e-4 if self.method == "lora" else 1e-3
