"""``rahf eval`` as a function: one config in, one report out (the CLI only parses and prints).

    from rahf.evaluate import EvalConfig, run_eval, write_report
    report = run_eval(EvalConfig(model="smollm2", pairs=["dev.jsonl.gz"], out="eval/smollm2"))
    write_report("eval/smollm2", report)

Stages, each only when its inputs are given: preference accuracy on every ``pairs`` file (model,
baseline; implicit reward with ``reference``), the reward model's own accuracy on those pairs,
generation on every prompt file (model and baseline) with behaviour metrics, reward scores and
the model-vs-baseline win rates. ``limit`` caps pairs / prompts per file (the first N valid).
Each stage appends typed entries to one :class:`~rahf.evaluate.schema.EvalReport`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rahf.data import load_preferences
from rahf.evaluate.behaviour import behaviour_stats
from rahf.evaluate.generation import GenerationCache, generate_turns
from rahf.evaluate.loading import describe, folder_fingerprint, load_for_eval
from rahf.evaluate.preference import preference_accuracy
from rahf.evaluate.prompts import load_prompts
from rahf.evaluate.report import environment
from rahf.evaluate.reward import compare, load_reward_model, pairwise_accuracy, score_rewards
from rahf.evaluate.schema import (
    ComparisonEntry,
    DataEntry,
    EvalReport,
    GenerationEntry,
    ModelEntry,
    PreferenceEntry,
    RewardModelAccuracyEntry,
)
from rahf.evaluate.scoring import score_pairs
from rahf.evaluate.settings import EvalConfig
from rahf.evaluate.stats import bootstrap
from rahf.io import atomic_write_json, atomic_write_text, file_digest


def source_name(path: str) -> str:
    """A short, readable label for a data file: ``parent/name`` (``hh-harmless/dev.jsonl.gz``)."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


def _data_entry(path: str, kind: str, n: int, *, format: str = "", invalid: dict | None = None) -> DataEntry:
    is_file = Path(path).is_file()
    return DataEntry(
        path=str(Path(path).resolve()) if is_file else path,
        source=source_name(path),
        kind=kind,
        sha256=file_digest(path) if is_file else None,
        format=format,
        n=n,
        invalid=invalid or {},
    )


@dataclass
class _Models:
    """Everything loaded for one evaluation: role -> (model, tokenizer, info), reference, RM."""

    evaluated: dict[str, tuple[Any, Any, Any]]  # "model" and optionally "baseline"
    reference: tuple[Any, Any, Any] | None
    reward_model: Any | None
    # role -> (a fresh steering context per call, generation-cache identity); the model's only
    steering: dict[str, tuple[Callable[[], AbstractContextManager], str]] = field(default_factory=dict)

    def steered(self, role: str) -> AbstractContextManager:
        return self.steering[role][0]() if role in self.steering else contextlib.nullcontext()


def _load_models(config: EvalConfig, report: EvalReport) -> _Models:
    evaluated = {}
    for role, spec in (("model", config.model), ("baseline", config.baseline)):
        if spec:  # the baseline goes through exactly the same stages as the model
            evaluated[role] = load_for_eval(spec, dtype=config.dtype, device=config.device)
            report.models[role] = ModelEntry.from_dict(evaluated[role][2].to_dict())
    reference = None
    if config.reference:
        reference = load_for_eval(config.reference, dtype=config.dtype, device=config.device)
        report.models["reference"] = ModelEntry.from_dict(reference[2].to_dict())
    rm = None
    if config.reward_model:
        rm = load_reward_model(config.reward_model, device=config.device)
        report.models["reward_model"] = ModelEntry.from_dict(describe(rm.path).to_dict() | {"spec": config.reward_model})
    models = _Models(evaluated, reference, rm)
    if config.steer:
        from rahf.steering.steer import steering_from_file

        model, _, info = evaluated["model"]
        # read once; a bad file, layer or hidden size fails here, before any scoring
        models.steering["model"] = steering_from_file(model, config.steer, strength=config.steer_strength,
                                                      layers=config.steer_layers, model_id=info.fingerprint)
        report.models["model"].steer = {"file": config.steer, "strength": config.steer_strength,
                                        "layers": config.steer_layers}
    return models


def _preference_stage(config: EvalConfig, models: _Models, report: EvalReport) -> None:
    """Accuracy of every evaluated model (and of the RM) on every pairs file."""
    boot = {"resamples": config.resamples, "seed": config.seed}
    windows = {"max_prompt_tokens": config.max_prompt_tokens, "max_reply_tokens": config.max_reply_tokens}
    for path in config.pairs:
        data = load_preferences(path, skip_invalid=config.skip_invalid, limit=config.limit, columns=config.columns)
        source = source_name(path)
        report.data.append(_data_entry(path, "pairs", len(data.pairs), format=data.format, invalid=data.invalid))
        reference_scores = None
        if models.reference is not None:  # scored once, shared by the model and the baseline
            reference_scores = score_pairs(
                models.reference[0], models.reference[1], data.pairs, batch_size=config.batch_size,
                progress=config.progress, desc=f"reference on {source}", **windows,
            )
        margins, entries = {}, {}
        for role, (model, tokenizer, _) in models.evaluated.items():
            with models.steered(role):
                result = preference_accuracy(
                    model, tokenizer, data.pairs, reference_scores=reference_scores,
                    instruction=config.treatment(role)["instruction"],
                    batch_size=config.batch_size, progress=config.progress,
                    desc=f"{role} on {source}", **windows, **boot,
                )
            margins[role] = result.pair_margins
            entries[role] = PreferenceEntry.from_result(source, role, result)
            report.preference.append(entries[role])
        if "baseline" in margins:  # the same pairs under both models: pair-to-pair spread cancels
            entries["model"].margin_vs_baseline = bootstrap(margins["model"] - margins["baseline"], **boot)
        if models.reward_model is not None:
            accuracy = _reward_model_accuracy(config, models.reward_model, data.pairs, boot)
            report.reward_model_accuracy.append(RewardModelAccuracyEntry.from_dict({"source": source, **accuracy}))


def _reward_model_accuracy(config: EvalConfig, rm: Any, pairs: list, boot: dict) -> dict:
    """The RM's accuracy on ``pairs``, from the disk cache when an earlier evaluation scored them.

    It depends on the RM and the pairs only, never on the evaluated model, and scoring both
    replies of every pair with the RM costs as much as the model's own pass: comparing several
    models on the same pairs should pay for it once.
    """
    if not config.cache:
        return pairwise_accuracy(rm, pairs, progress=config.progress, **boot)
    blob = json.dumps({"rm": folder_fingerprint(str(rm.path)), **boot,
                       "pairs": [[p.prompt_text(), p.chosen, p.rejected] for p in pairs]}, sort_keys=True)
    path = GenerationCache(config.cache_dir).root / "reward-accuracy" / f"{hashlib.sha256(blob.encode()).hexdigest()}.json"
    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.read_text())
    accuracy = pairwise_accuracy(rm, pairs, progress=config.progress, **boot)
    atomic_write_json(path, accuracy)
    return accuracy


def _generation_stage(config: EvalConfig, models: _Models, report: EvalReport) -> list[dict]:
    """Replies of every evaluated model on every prompt file; behaviour, rewards, win rates.

    Returns one record per reply (for generations.jsonl).
    """
    boot = {"resamples": config.resamples, "seed": config.seed}
    records: list[dict] = []
    cache = GenerationCache(config.cache_dir) if config.cache else None
    prompt_files = [(p, None) for p in config.prompts] + [(p, True) for p in config.harmful_prompts]
    for path, harmful in prompt_files:
        prompt_set = load_prompts(path, harmful=harmful, limit=config.limit)
        source = source_name(path)
        report.data.append(_data_entry(path, "harmful prompts" if harmful else "prompts",
                                       len(prompt_set.items), format=prompt_set.format))
        by_role: dict[str, GenerationEntry] = {}
        for role, (model, tokenizer, info) in models.evaluated.items():
            model_id = models.steering[role][1] if role in models.steering else info.fingerprint
            with models.steered(role):
                turns = generate_turns(
                    model, tokenizer, prompt_set.items,
                    max_new_tokens=config.max_new_tokens, do_sample=config.do_sample,
                    temperature=config.temperature, top_p=config.top_p, seed=config.seed,
                    batch_size=config.batch_size, instruction=config.treatment(role)["instruction"], cache=cache,
                    model_id=model_id, progress=config.progress,
                )
            texts = [t.result.text for t in turns]
            entry = GenerationEntry(
                source=source,
                model=role,
                n_items=len(prompt_set.items),
                n_replies=len(turns),
                behaviour=behaviour_stats(
                    texts, tokens=[t.result.tokens for t in turns],
                    hit_limit=[t.result.hit_limit for t in turns],
                    harmful=[prompt_set.items[t.item_index].harmful for t in turns],
                ),
                lengths_chars=[len(text) for text in texts],
            )
            if models.reward_model is not None:
                rewards = score_rewards(models.reward_model, [t.conversation for t in turns], texts,
                                        batch_size=config.batch_size, progress=config.progress)
                entry.rewards = rewards.tolist()
                entry.mean_reward = bootstrap(rewards, **boot)
            report.generation.append(entry)
            by_role[role] = entry
            records += [
                {"source": source, "model": role, "id": t.item_id, "turn": t.turn,
                 "prompt": t.conversation[-1]["content"], "reply": t.result.text,
                 "tokens": t.result.tokens, "hit_limit": t.result.hit_limit,
                 "harmful": prompt_set.items[t.item_index].harmful,
                 "reward": entry.rewards[k] if entry.rewards else None}
                for k, t in enumerate(turns)
            ]
        if models.reward_model is not None and "baseline" in by_role:
            a, b = by_role["model"], by_role["baseline"]
            result = compare(np.asarray(a.rewards), np.asarray(b.rewards), a.lengths_chars, b.lengths_chars, **boot)
            report.comparisons.append(ComparisonEntry(source, **vars(result)))
    return records


def run_eval(config: EvalConfig) -> EvalReport:
    """Run every stage the config asks for and return the report (``to_dict()``: report.json).

    Also writes ``generations.jsonl`` (every reply, for reading) to ``config.out``.
    """
    started = time.time()
    report = EvalReport(settings=dataclasses.asdict(config), environment=environment())
    timing = report.timing
    models = _load_models(config, report)
    timing["load_models"] = time.time() - started
    t = time.time()
    _preference_stage(config, models, report)
    timing["preference"] = time.time() - t
    t = time.time()
    records = _generation_stage(config, models, report)
    timing["generation"] = time.time() - t
    if records:
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        atomic_write_text(Path(config.out) / "generations.jsonl", lines)
    else:  # an older run's replies must not pass for this one's (report.html reads the file)
        Path(config.out, "generations.jsonl").unlink(missing_ok=True)
    timing["total"] = time.time() - started
    return report
