"""rahf: align causal language models to human preferences by representation engineering.

    from rahf import AlignConfig, align
    final = align(AlignConfig(method="dual", model="smollm2", data="builtin", run_dir="runs/demo"))
    # final/adapter (PEFT LoRA) and final/merged (plain transformers model)
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["AlignConfig", "align", "load_config"]


def __getattr__(name: str) -> Any:
    # Lazy, so `rahf --help` does not pay for importing torch and transformers.
    if name in ("AlignConfig", "load_config"):
        from rahf import config

        return getattr(config, name)
    if name == "align":
        from rahf.pipeline import align

        return align
    raise AttributeError(name)
