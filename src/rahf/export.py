"""Use: the final adapter, the merged model, the model card, logs and loss curves.

``final/adapter`` and ``final/merged`` are separate folders on purpose: transformers 5 loads a
folder holding both as the merged weights plus the adapter again, applying the change twice.
Both load with plain transformers / PEFT, no rahf import needed.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from rahf.config import AlignConfig
from rahf.io import atomic_dir, atomic_write_text


def export_aligned(plan, run, base: str, out: Path, *, logs: dict, readiness: list, fit_result: dict,
                   data_stats: dict) -> dict:
    """The ``final`` stage of ``rahf align``: adapter, merged model, logs, config and model card."""
    from rahf.method.convergence import check_lines, checks_records

    config, layers, tokenizer = plan.config, plan.layers, plan.tokenizer
    write_adapter(run.stage("fit") / "adapter", out / "adapter", base)
    write_merged(out / "adapter", out / "merged", tokenizer)
    write_logs(logs, out, extra=checks_records(readiness, fit_result))
    config.save(out / "config.yaml")
    name = plan.method.name
    card = model_card(
        config,
        title=f"RAHF-{name.upper()} adapter",
        summary=f"Aligned by representation engineering (RAHF, method **{name}**).",
        settings=f"Target layers (hidden_states indices) {layers}, alpha {config.patterns.alpha}, patterns on"
        f" `{config.pattern_reply}` replies; fitting LoRA r={config.fit.lora.r} on {config.fit.lora.target_modules}.",
        base=base, data_stats=data_stats, logs=logs, tags=("representation-engineering", "alignment", "lora"),
        checks=check_lines(config, readiness, fit_result, data_stats),
    )
    atomic_write_text(out / "README.md", card)
    return {}


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

    from rahf.models import load_model, loading_alone

    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]

    def build(tmp: Path) -> None:
        model.merge_and_unload().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    with loading_alone():  # the main process alone runs export (ZeRO-3 would partition collectively)
        model = PeftModel.from_pretrained(load_model(base, dtype=dtype, device="cpu"), str(adapter))
        atomic_dir(out, build)


def write_logs(logs: dict[str, list[dict]], out: Path, *, extra: list[dict] | None = None) -> None:
    """``metrics.jsonl`` (one record per logged step, with its stage, then ``extra`` records such
    as the step-1 readiness check) and ``loss.png``."""
    lines = [json.dumps({"stage": stage, **record}) for stage, records in logs.items() for record in records]
    lines += [json.dumps(record) for record in extra or []]
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


# Embedded model names -> (hub id of the model they were made from, its license).
EMBEDDED_ORIGINS = {"smollm2": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
UNKNOWN_LICENSE = "other"  # with license_name / license_link pointing at the base model's terms


def hub_model_id(model: str) -> str | None:
    """The hub id behind ``--model`` (the embedded default maps to its origin); None for a local folder."""
    if model in EMBEDDED_ORIGINS:
        return EMBEDDED_ORIGINS[model][0]
    if Path(model).expanduser().exists() or model.startswith((".", "/", "~")):
        return None
    return model if _HUB_ID.match(model) and "/" in model else None


def hub_dataset_id(data: str) -> str | None:
    """The hub dataset id behind ``--data``; None for ``builtin`` and local files or folders."""
    from rahf.data.readers import BUILTIN

    if data == BUILTIN or Path(data).expanduser().exists() or data.startswith((".", "/", "~")):
        return None
    return data if _HUB_ID.match(data) and not data.lower().endswith((".json", ".jsonl", ".parquet", ".csv", ".gz")) else None


def base_license(model: str) -> str | None:
    """The base model's license from what is on disk (no network): the embedded default's is known;
    a local folder's or a cached hub model's ``README.md`` may state it in its metadata."""
    from huggingface_hub import metadata_load, try_to_load_from_cache

    if model in EMBEDDED_ORIGINS:
        return EMBEDDED_ORIGINS[model][1]
    path = Path(model).expanduser()
    readme = path / "README.md" if path.is_dir() else None
    if readme is None and hub_model_id(model):
        cached = try_to_load_from_cache(model, "README.md")
        readme = Path(cached) if isinstance(cached, str) else None
    if readme is None or not readme.is_file():
        return None
    try:
        value = (metadata_load(readme) or {}).get("license")
    except Exception:  # a README without valid YAML metadata says nothing about the license
        return None
    return value if isinstance(value, str) and value else None


def card_metadata(
    config: AlignConfig, *, title: str, has_adapter: bool, tags: tuple[str, ...], logs: dict,
    results: dict[str, float] | None = None,
):
    """The card's Hub metadata (``huggingface_hub.ModelCardData``).

    ``base_model`` and ``datasets`` only name hub ids (local paths mean nothing on the Hub). The
    license is the base model's (a fine-tune inherits its terms) when rahf can read it, else
    ``other`` with ``license_name: base-model-license``, to be checked before publishing.
    ``model-index`` holds the numbers the run measured: each stage's final training loss, plus
    ``results`` (name -> value) when the caller has more.
    """
    from huggingface_hub import EvalResult, ModelCardData

    base_id = hub_model_id(config.model)
    data_id = hub_dataset_id(config.data)
    license_id = base_license(config.model)
    extra = {}
    if license_id is None:
        license_id, extra["license_name"] = UNKNOWN_LICENSE, "base-model-license"
        if base_id:
            extra["license_link"] = f"https://huggingface.co/{base_id}"
    dataset_name = "rahf built-in demo set" if config.data == "builtin" else data_id or Path(config.data).name
    measured = [
        (f"{stage} final train loss", "loss", records[-1]["loss"]) for stage, records in logs.items() if records
    ] + [(name, name, value) for name, value in (results or {}).items()]
    evals = [
        EvalResult(
            task_type="text-generation", task_name="preference alignment", dataset_type=data_id or "local",
            dataset_name=dataset_name, dataset_split="train", metric_type=kind, metric_name=name,
            metric_value=round(float(value), 6),
        )
        for name, kind, value in measured
    ]
    return ModelCardData(
        base_model=base_id, library_name="peft" if has_adapter else "transformers",
        pipeline_tag="text-generation", tags=["rahf", *tags], license=license_id,
        datasets=[data_id] if data_id else None, model_name=title, eval_results=evals or None, **extra,
    )


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
    checks: list[str] | None = None,
    results: dict[str, float] | None = None,
) -> str:
    """The ``README.md`` of a final folder: what was trained, from what, on what, how it ended.

    Shared by RAHF and the baselines so every method's card reads the same. It opens with the
    Hub's YAML metadata (:func:`card_metadata`), so ``rahf align --push-to-hub`` can upload it as is.
    """
    import peft
    import torch
    import transformers

    metadata = card_metadata(config, title=title, has_adapter=has_adapter, tags=tags, logs=logs, results=results)
    license_note = (
        f"License: `{metadata.license}`, the base model's."
        if metadata.license != UNKNOWN_LICENSE
        else "License: the base model's terms apply, and rahf could not read them: set `license` above before publishing."
    )
    last = {stage: records[-1] for stage, records in logs.items() if records}
    rows = "\n".join(f"| {stage} | {r['step']} | {r['loss']:.4f} |" for stage, r in last.items())
    files = (
        f"- `adapter/`: LoRA adapter; its base weights are `{base}`\n"
        "- `merged/`: the adapter merged into those weights (plain transformers model)"
        if has_adapter
        else "- `merged/`: the fine-tuned weights (plain transformers model)"
    )
    return f"""---
{metadata.to_yaml()}
---

# {title}

{summary} Trained with [rahf](https://pypi.org/project/rahf/) from `{config.model}`.

{files}

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("merged")  # pushed to the Hub: (REPO, subfolder="merged")
```

{license_note}

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
""" + ("\n## Checks\n" + "\n".join(f"- {line}" for line in checks) + "\n" if checks else "")


MERGED_IN_REPO = "merged"  # the merged weights' folder in a pushed repo; the adapter sits at its root
_ROOT_FILES = ("README.md", "config.yaml", "metrics.jsonl", "loss.png")


class PushError(OSError):
    """Uploading a finished run to the Hub failed; the message says what to do (the run is kept)."""


def hub_files(final: Path) -> list[tuple[Path, str]]:
    """``(local file, path in the repo)`` for a final folder: the adapter's files and the card at
    the root (PEFT and the Hub read an adapter there), the merged weights under ``merged/``
    (transformers would load a folder holding both as merged weights plus the adapter again)."""
    files: list[tuple[Path, str]] = []
    adapter = final / "adapter"
    if adapter.is_dir():
        files += [(f, f.name) for f in sorted(adapter.iterdir()) if f.is_file()]
    merged = final / "merged"
    files += [(f, f"{MERGED_IN_REPO}/{f.name}") for f in sorted(merged.iterdir()) if f.is_file()] if merged.is_dir() else []
    files += [(final / name, name) for name in _ROOT_FILES if (final / name).is_file()]
    return files


def check_push_target(repo_id: str) -> None:
    """Fail before any training when a push could not work: a malformed repo id or no token."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from rahf.config import ConfigError

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ConfigError(f"--push-to-hub {repo_id!r}: not a Hub repo id (owner/name): {err}") from None
    if "/" not in repo_id:
        raise ConfigError(f"--push-to-hub {repo_id!r}: give the full repo id, owner/name")
    if get_token() is None:
        raise ConfigError(
            f"--push-to-hub {repo_id}: no Hugging Face token found: run `hf auth login` or set HF_TOKEN first"
        )


def push_to_hub(final: str | Path, repo_id: str, *, private: bool = False, api=None) -> str:
    """Upload a final folder to the Hub model repo ``repo_id`` in one commit; returns the repo URL.

    Layout (:func:`hub_files`): adapter + model card + config.yaml / metrics.jsonl / loss.png at
    the root, merged weights in ``merged/``. The repo is created if missing (``private`` then
    applies; an existing repo keeps its visibility). The token comes from ``HF_TOKEN`` or
    ``hf auth login``, as for every Hugging Face tool.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    final = Path(final)
    files = hub_files(final)
    if not any(path == "README.md" for _, path in files):
        raise FileNotFoundError(f"{final}: no README.md; not a finished rahf run (rerun the command that made it)")
    api = api or HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.create_commit(
            repo_id,
            operations=[CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(local)) for local, path in files],
            commit_message=f"Upload {final.parent.name} (rahf)",
            repo_type="model",
        )
    except OSError as err:  # HfHubHTTPError and network errors are OSErrors
        raise PushError(
            f"pushing {final} to {repo_id} failed: {' '.join(str(err).split())}; the run is kept:"
            " fix the cause (token: `hf auth login` or HF_TOKEN) and rerun the same command to push again"
        ) from err
    return str(url)
