"""rahf: align causal language models to human preferences by representation engineering.

    from rahf import AlignConfig, align
    final = align(AlignConfig(method="dual", model="smollm2", data="builtin", run_dir="runs/demo"))
    # final/adapter (PEFT LoRA) and final/merged (plain transformers model)

or, with a model, tokenizer and pairs already in hand (as TRL's trainers take them):

    from rahf import AlignConfig, align_model
    aligned = align_model(model, tokenizer, pairs, AlignConfig(method="dual", run_dir="runs/mine"))
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["AlignConfig", "align", "align_model", "load_config"]


def __getattr__(name: str) -> Any:
    # Lazy, so `rahf --help` does not pay for importing torch and transformers.
    if name in ("AlignConfig", "load_config"):
        from rahf import config

        return getattr(config, name)
    if name in ("align", "align_model"):
        from rahf import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
