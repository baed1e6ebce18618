"""A run plan: the config resolved once into what the stages of one run need.

The model name is resolved to a path (the embedded default converted once), the tokenizer
loaded, the target layers checked against the model's depth, the method chosen and the
precision decided, here only; each stage then gets the plan and its own config section, and
never resolves the model again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rahf.config import AlignConfig
    from rahf.method import Method


@dataclass(frozen=True)
class RunPlan:
    config: AlignConfig  # the stage settings (step1, patterns, fit) and run-wide ones
    method: Method  # SCIT or Dual: rahf.method.method_for
    model_path: str  # the model being aligned, resolved: a local folder or a hub id
    tokenizer: Any  # right-padded, with a pad token (rahf.models.load_tokenizer)
    layers: list[int]  # target layers: hidden_states indices, checked against the depth
    bf16: bool  # bf16 autocast with fp32 master weights (rahf.trainer.use_bf16)

    @property
    def windows(self) -> dict[str, int]:
        """Prompt and reply token windows, as ``rahf.data.render.encode`` takes them."""
        return {"max_prompt_tokens": self.config.max_prompt_tokens, "max_reply_tokens": self.config.reply_window}

    def load_model(self, path: str | None = None):
        """The weights at ``path`` (default: the model being aligned) in the run's dtype and device."""
        from rahf.models import load_model

        return load_model(path or self.model_path, dtype=self.config.dtype, device=self.config.device)


def plan_run(config: AlignConfig, *, tokenizer: Any = None, layers: list[int] | None = None) -> RunPlan:
    """Resolve ``config`` once. ``tokenizer`` / ``layers``: already at hand (the library path)."""
    from rahf.method import method_for
    from rahf.models import load_tokenizer, resolve_model_path
    from rahf.preflight import target_layers
    from rahf.trainer import use_bf16

    path = resolve_model_path(config.model)
    return RunPlan(
        config=config,
        method=method_for(config),
        model_path=path,
        tokenizer=tokenizer if tokenizer is not None else load_tokenizer(path),
        layers=list(layers) if layers is not None else target_layers(config),
        bf16=use_bf16(config),
    )
