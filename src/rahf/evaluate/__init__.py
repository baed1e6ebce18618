"""Evaluation: evidence that an aligned model is better and did not break.

    from rahf.evaluate import EvalConfig, run_eval, write_report
    report = run_eval(EvalConfig(model="runs/rahf/merged", baseline="smollm2",
                                 pairs=["dev.jsonl.gz"], prompts=["questions.jsonl"], out="eval/a"))
    write_report("eval/a", report)  # report.json, report.md, report.html, PNG plots

Modules, in the order a report is built: ``scoring`` (reply log-likelihoods) + ``preference``
(held-out preference accuracy, implicit reward), ``prompts`` + ``generation`` (cached, batched
replies; MT-Bench turn by turn), ``reward`` (reward-model scores, win rates) and ``reward_model``
(``rahf train-rm``), ``behaviour`` (length, repetition, refusals, offensive language), ``stats``
(bootstrap intervals, length-controlled win rate), ``run`` (the whole evaluation), ``schema``
(the typed report, ``EvalReport``), ``report`` + ``html_report`` + ``plots`` (its files).
"""

from __future__ import annotations

import importlib
from typing import Any

# Imported on first use, so that `rahf --help` does not load torch and transformers.
_EXPORTS = {
    "EvalConfig": "rahf.evaluate.run",
    "EvalReport": "rahf.evaluate.schema",
    "run_eval": "rahf.evaluate.run",
    "write_report": "rahf.evaluate.report",
    "read_report": "rahf.evaluate.report",
    "compare_reports": "rahf.evaluate.report",
    "generate": "rahf.evaluate.generation",
    "GenerationResult": "rahf.evaluate.generation",
    "preference_accuracy": "rahf.evaluate.preference",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rahf.evaluate' has no attribute {name!r}")
