"""Use: the final adapter, the merged model, the model card, logs and loss curves.

``final/adapter`` and ``final/merged`` are separate folders on purpose: transformers 5 loads a
folder holding both as the merged weights plus the adapter again, applying the change twice.
Both load with plain transformers / PEFT, no rahf import needed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rahf.config import AlignConfig
from rahf.io import atomic_dir, atomic_write_text


def write_adapter(fit_adapter: Path, out: Path, base: str) -> None:
    """Copy the fitted adapter, pointing ``base_model_name_or_path`` at the weights it applies to."""

    def build(tmp: Path) -> None:
        for item in fit_adapter.iterdir():
            if item.is_file():
                shutil.copy2(item, tmp / item.name)
        config_path = tmp / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = base
        config_path.write_text(json.dumps(config, indent=2))

    atomic_dir(out, build)


def write_merged(adapter: Path, out: Path, tokenizer, *, dtype: str = "float32") -> None:
    from peft import PeftModel

    from rahf.models import load_model

    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(load_model(base, dtype=dtype, device="cpu"), str(adapter))

    def build(tmp: Path) -> None:
        model.merge_and_unload().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    atomic_dir(out, build)


def write_logs(logs: dict[str, list[dict]], out: Path) -> None:
    """``metrics.jsonl`` (one record per logged step, with its stage) and ``loss.png``."""
    lines = [json.dumps({"stage": stage, **record}) for stage, records in logs.items() for record in records]
    atomic_write_text(out / "metrics.jsonl", "\n".join(lines) + ("\n" if lines else ""))
    plot_losses(logs, out / "loss.png")


def plot_losses(logs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s, records in logs.items() if records]
    fig, axes = plt.subplots(1, max(1, len(stages)), figsize=(4 * max(1, len(stages)), 3), squeeze=False)
    for ax, stage in zip(axes[0], stages, strict=False):
        records = logs[stage]
        ax.plot([r["step"] for r in records], [r["loss"] for r in records], marker=".")
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def model_card(
    config: AlignConfig,
    *,
    title: str,
    summary: str,
    settings: str,
    base: str,
    data_stats: dict,
    logs: dict,
    has_adapter: bool = True,
    tags: tuple[str, ...] = (),
) -> str:
    """The ``README.md`` of a final folder: what was trained, from what, on what, how it ended.

    Shared by RAHF and the baselines so every method's card reads the same.
    """
    import peft
    import torch
    import transformers

    last = {stage: records[-1] for stage, records in logs.items() if records}
    rows = "\n".join(f"| {stage} | {r['step']} | {r['loss']:.4f} |" for stage, r in last.items())
    files = (
        f"- `adapter/`: LoRA adapter; its base weights are `{base}`\n"
        "- `merged/`: the adapter merged into those weights (plain transformers model)"
        if has_adapter
        else "- `merged/`: the fine-tuned weights (plain transformers model)"
    )
    return f"""---
library_name: {"peft" if has_adapter else "transformers"}
base_model: {base}
tags: [{", ".join(("rahf", *tags))}]
license: apache-2.0
---

# {title}

{summary} Trained with [rahf](https://pypi.org/project/rahf/) from `{config.model}`.

{files}

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("merged")
```

## Data
`{config.data}`: {data_stats.get('train', '?')} training pairs, {data_stats.get('validation', '?')} validation pairs
(format: {data_stats.get('format', '?')}); prompts cut to {config.max_prompt_tokens} tokens, replies to {config.reply_window}.

## Settings
{settings} Seed {config.seed}. Full configuration: `config.yaml`.
Versions: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}.

## Training
| stage | steps | final loss |
|---|---|---|
{rows}

Per-step logs: `metrics.jsonl`; loss curves: `loss.png`.
"""
