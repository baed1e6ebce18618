"""Step 1 as pipeline stages, followed by the readiness check (and, optionally, more training).

``step1.until_separated`` trains step 1 on in chunks of ``step1.chunk_steps`` until the readiness
interval clears 0 or ``step1.max_steps_cap`` is reached. A chunk reopens each step-1 stage
(its ``DONE.json`` is removed, its checkpoints kept) and resumes it from its last checkpoint with
a larger step budget; the stage then finishes as usual. The schedule is that of the new total
(constant schedules, the default, are unaffected). Each measurement is cached in
``RUN_DIR/readiness/steps-<n>.json`` with a digest of the step-1 files it scored, so a rerun
does not score the same state twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rahf.config import AlignConfig
from rahf.data.schema import PreferencePair
from rahf.io import atomic_write_json, is_main_process, read_marker, wait_for_everyone
from rahf.method.readiness import (
    Readiness,
    held_out_pairs,
    not_separated_line,
    train_until_separated,
)
from rahf.models import loading_alone
from rahf.trainer import TrainingError

if TYPE_CHECKING:
    from rahf.plan import RunPlan
    from rahf.runs import RunDir


class NotSeparated(TrainingError):
    """Step 1 reached its cap without separating and ``step1.on_not_separated`` is ``stop``."""


def with_steps(config: AlignConfig, steps: int) -> AlignConfig:
    """``config`` with step 1 budgeted to exactly ``steps`` optimizer steps."""
    train = dataclasses.replace(config.step1.train, max_steps=steps)
    return dataclasses.replace(config, step1=dataclasses.replace(config.step1, train=train))


def step1_digest(run, names: Sequence[str]) -> str:
    """Digest of the step-1 stages' files (logs aside): which state a measurement scored."""
    files = {name: {k: v for k, v in ((read_marker(run.stage(name) / "DONE.json") or {}).get("files") or {}).items()
                    if k != "log.json"} for name in names}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _reopen(run, name: str, steps: int) -> None:
    """Let a finished step-1 stage train on to ``steps``: drop its marker, keep its checkpoints."""
    marker_path = run.stage(name) / "DONE.json"
    marker = read_marker(marker_path) or {}
    wait_for_everyone()
    if marker and int(marker.get("result", {}).get("steps", steps)) < steps and is_main_process():
        marker_path.unlink()
    wait_for_everyone()


def step1_with_readiness(
    plan: RunPlan,
    run: RunDir,
    pairs: Sequence[PreferencePair],
    patterns: Sequence[PreferencePair],
    log: dict[str, list],
) -> list[Readiness]:
    """Run step 1's stages on ``pairs``, then measure readiness on pairs step 1 never saw
    (``patterns`` when the halves are disjoint, else the validation split). Returns the
    measurements in order (empty when ``step1.readiness_pairs`` is 0 or nothing is held out)."""
    from rahf.runs import read_pairs, run_stage

    config, method = plan.config, plan.method
    names = method.step1_stages

    def work(name: str, budget: AlignConfig):
        staged = dataclasses.replace(plan, config=budget)
        return lambda out: method.train_step1(staged, name, list(pairs), out)

    def train_to(target: int | None) -> int:
        steps = []
        for name in names:
            if target is not None:
                _reopen(run, name, target)
            budget = config if target is None else with_steps(config, target)
            result = run_stage(run, name, work(name, budget), log=log, seed=config.seed)
            steps.append(int(result.get("steps", 0)))
        return min(steps)

    if config.step1.readiness_pairs == 0:
        train_to(None)
        return []
    held, source = held_out_pairs(patterns, read_pairs(run.stage("data") / "validation.jsonl"), config)
    if not held:
        train_to(None)
        if is_main_process():
            print("rahf: step-1 readiness skipped: no held-out pairs (set validation_fraction or patterns.disjoint_share > 0)")
        return []

    def measure(steps: int) -> Readiness:
        path = run.root / "readiness" / f"steps-{steps}.json"
        digest = step1_digest(run, names)
        if is_main_process():
            cached = read_marker(path) or {}
            if cached.get("step1") != digest:
                with loading_alone():  # main process only: no collective (ZeRO-3) loads
                    result = method.readiness(plan, run, held, source=source, steps=steps)
                atomic_write_json(path, {"step1": digest, "result": result.to_dict()})
        wait_for_everyone()
        result = Readiness.from_dict(json.loads(Path(path).read_text())["result"])
        if is_main_process():
            hint = "" if result.separated or config.step1.until_separated else " (step1.until_separated=true trains on until it does)"
            print(result.line() + hint)
        return result

    step1 = config.step1
    history = train_until_separated(train_to, measure, until=step1.until_separated, chunk=step1.chunk_steps,
                                    cap=step1.max_steps_cap)
    final = history[-1]
    if step1.until_separated and not final.separated:
        line = not_separated_line(final, config)
        if step1.on_not_separated == "stop":
            raise NotSeparated(line.removeprefix("rahf: "))
        if is_main_process():
            print(line)
    return history
