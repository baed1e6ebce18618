"""Everything ``rahf align`` can check and plan before loading weights (``--dry-run``).

A mistake in the data or the config should cost seconds, not a step-1 run.
"""

from __future__ import annotations

import math

from rahf.config import AlignConfig, ConfigError, check_against_model
from rahf.data import load_preferences, split_pairs
from rahf.data.schema import DataError
from rahf.io import check_writable_dir
from rahf.models import model_config


def target_layers(config: AlignConfig) -> list[int]:
    return check_against_model(config, model_config(config.model).num_hidden_layers)


def preflight(config: AlignConfig) -> None:
    """Checks that need the model's shape or the environment, run before any weights load.

    Each would otherwise surface as a library traceback at step 1: a seed numpy refuses, a zero
    save/log interval, LoRA target modules the model lacks, a ``report_to`` logger that is not
    installed. Raises ConfigError naming the key.
    """
    if not 0 <= config.seed < 2**32:
        raise ConfigError(f"seed must be in 0..{2**32 - 1}, got {config.seed}")
    for key in ("save_steps", "logging_steps"):
        value = getattr(config, key)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key} must be an integer >= 1, got {value!r}")
    _check_report_to(config.report_to)
    _check_engine(config)
    names = _module_names(config.model)
    for key, lora in (("step1.lora", None if config.step1.full_finetune else config.step1.lora), ("fit.lora", config.fit.lora)):
        if lora is None or not names or lora.target_modules == ["all-linear"]:
            continue
        missing = [m for m in lora.target_modules if not any(n == m or n.endswith("." + m) for n in names)]
        if missing:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names if "." in n and not n.rsplit(".", 1)[-1].isdigit()})
            raise ConfigError(
                f"{key}.target_modules {missing} not found in {config.model}; its module names include"
                f" {', '.join(leaves[:20])} (or use ['all-linear'])"
            )


def _check_engine(config: AlignConfig) -> None:
    """An FSDP launch on CPU ranks would run unsharded (as DDP): refuse it before any weights load.
    Elsewhere :func:`rahf.trainer.trainer_arguments` checks accelerate's own state."""
    import torch

    from rahf.trainer import refuse_unsharded_fsdp

    if config.device == "cpu" or not torch.cuda.is_available():
        refuse_unsharded_fsdp("MULTI_CPU")


def _module_names(model: str) -> list[str]:
    """Module names of ``model``, from a skeleton on the meta device (no weights, no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(model_config(model))
    except Exception:  # noqa: BLE001 - e.g. remote code: leave the check to PEFT at step 1
        return []
    return [name for name, _ in skeleton.named_modules()]


def _check_report_to(report_to: list[str]) -> None:
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    checked = {"tensorboard", "wandb", "mlflow", "comet_ml", "neptune", "clearml", "dvclive", "codecarbon", "swanlab", "trackio", "dagshub"}
    available = set(get_available_reporting_integrations())
    for name in report_to:
        if name in ("none", "all"):
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            raise ConfigError(f"report_to: unknown logger '{name}'; use none, all or one of {', '.join(sorted(INTEGRATION_TO_CALLBACK))}")
        if name in checked and name not in available:
            raise ConfigError(f"report_to: '{name}' is not installed (pip install {name}), or drop it from report_to")


def plan(config: AlignConfig) -> dict:
    """What ``align`` would do, from the data and config alone (no weights loaded).

    Runs every check ``align`` runs before its first step (config, model shape, data rows, token
    windows, run folder), so a mistake shows up in seconds. :func:`format_plan` prints it.
    """

    from rahf.data.render import TruncationStats, encode
    from rahf.method import method_for
    from rahf.models import load_tokenizer

    layers = target_layers(config)
    preflight(config)
    check_writable_dir(config.run_dir)
    model_cfg = model_config(config.model)
    loaded = load_preferences(config.data, format=config.data_format, skip_invalid=config.skip_invalid,
                              split=config.data_split, columns=config.data_columns)
    train, validation = split_pairs(loaded.pairs, validation_fraction=config.validation_fraction, seed=config.seed)
    train = train[: config.max_pairs] if config.max_pairs else train
    if not train:
        raise DataError(f"{config.data}: no training pairs left after filtering and the validation split")
    tokenizer = load_tokenizer(config.model)
    method = method_for(config)
    # SCIT puts an instruction before every prompt: check the window against the longer one.
    instruction = max(config.preferred_instruction, config.dispreferred_instruction, key=len) if method.instructed else None
    stats = TruncationStats()
    tokens = 0
    for pair in train:
        for reply in (pair.chosen, pair.rejected):
            encoded = encode(
                tokenizer, pair.prompt, reply, instruction=instruction, max_prompt_tokens=config.max_prompt_tokens,
                max_reply_tokens=config.reply_window, origin=pair.origin,
            )
            stats.add(encoded, count_prompt=reply is pair.chosen)
            tokens += len(encoded.input_ids)

    def steps(train_cfg, examples: int) -> int:
        if train_cfg.max_steps > 0:
            return train_cfg.max_steps
        return math.ceil(train_cfg.epochs * math.ceil(examples / (train_cfg.batch_size * train_cfg.grad_accum)))

    from rahf.runs import halves

    step1_pairs, pattern_pairs = halves(config, train)
    step1_examples = method.step1_examples_per_pair * len(step1_pairs)
    fit_examples = len(pattern_pairs) * (2 if config.pattern_reply == "both" else 1)
    stages = [*method.step1_stages, "fit", "final"]
    hidden, n_layers = model_cfg.hidden_size, model_cfg.num_hidden_layers
    params = n_layers * 12 * hidden * hidden + 2 * model_cfg.vocab_size * hidden  # rough, for the estimate
    bytes_per = 2 if config.dtype == "bfloat16" else 4
    # Step 3 holds the base plus, for Dual full copies, the two step-1 models.
    copies = method.fit_weight_copies(config)
    return {
        "method": config.method,
        "model": config.model,
        "data": {"source": config.data, "format": loaded.format, "train_pairs": len(train), "validation_pairs": len(validation), "invalid": loaded.invalid,
                 "step1_pairs": len(step1_pairs), "pattern_pairs": len(pattern_pairs), "disjoint_share": config.patterns.disjoint_share},
        "stages": stages,
        "target_layers": layers,
        "steps": {method.step1_steps_label: steps(config.step1.train, step1_examples), "fit": steps(config.fit.train, fit_examples)},
        "examples": {"step1": step1_examples, "fit": fit_examples},
        "tokens": {"train_total": tokens, "truncated_prompts": stats.prompts_truncated, "truncated_replies": stats.replies_truncated},
        "estimated_weights_gb": round(params * bytes_per / 1e9, 2),
        "estimated_fit_weights_gb": round(copies * params * bytes_per / 1e9, 2),
        "run_dir": config.run_dir,
    }


def format_plan(plan_: dict) -> str:
    """``plan()`` as a short table for people (``--json`` keeps the dict for scripts)."""
    data, tokens = plan_["data"], plan_["tokens"]
    step1_steps = next(v for k, v in plan_["steps"].items() if k.startswith("step1"))
    rows = [("stage", "steps", "examples")]
    for stage in plan_["stages"]:
        if stage.startswith("step1"):
            rows.append((stage, str(step1_steps), str(plan_["examples"]["step1"])))
        elif stage == "fit":
            rows.append((stage, str(plan_["steps"]["fit"]), str(plan_["examples"]["fit"])))
        else:
            rows.append((stage, "-", "-"))
    invalid = sum(data["invalid"].values())
    lines = [
        "rahf align --dry-run: config and data are valid; nothing was trained",
        f"  method         {plan_['method']}",
        f"  model          {plan_['model']}",
        f"  data           {data['source']} ({data['format']}): {data['train_pairs']} train / "
        f"{data['validation_pairs']} validation pairs" + (f", {invalid} invalid rows skipped" if invalid else ""),
        f"  halves         {data['step1_pairs']} pairs train step 1, {data['pattern_pairs']} feed steps 2-3"
        + (f" (disjoint by prompt, patterns.disjoint_share={data['disjoint_share']})" if data["disjoint_share"] else " (the same pairs: patterns.disjoint_share=0)"),
        f"  target layers  {', '.join(map(str, plan_['target_layers']))}",
        f"  tokens         {tokens['train_total']} in the training pairs; truncated: "
        f"{tokens['truncated_prompts']} prompts, {tokens['truncated_replies']} replies",
        f"  memory         ~{plan_['estimated_weights_gb']} GB of weights (~{plan_['estimated_fit_weights_gb']} GB in step 3)",
        f"  run dir        {plan_['run_dir']}",
        "",
    ]
    lines += [f"  {a:<20}{b:>7}{c:>10}" for a, b, c in rows]
    return "\n".join(lines)
