"""Evaluation reports: ``report.json`` (every number), ``report.md`` (tables), PNG plots, and
``report.html`` (tables, plots and every generation side by side; ``html_report.py``).

``report.json`` is the source of truth; the markdown, the HTML and the plots are rebuilt from it
(the HTML adds the replies of ``generations.jsonl``), and ``rahf eval compare`` reads only it.
Its layout is :class:`rahf.evaluate.schema.EvalReport`: every function here takes one (or a
report.json dict, read through ``EvalReport.from_dict``).
"""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rahf.evaluate.schema import SCHEMA_VERSION, EvalReport, as_report
from rahf.evaluate.stats import Estimate
from rahf.io import atomic_write_bytes, atomic_write_json, atomic_write_text

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def environment() -> dict[str, Any]:
    """Versions and machine, for provenance."""
    import importlib.metadata as metadata

    import torch

    versions = {}
    for package in ("rahf", "torch", "transformers", "peft", "trl", "datasets", "numpy",
                    "alt-profanity-check"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "cpu_threads": torch.get_num_threads(),
        "versions": versions,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_report(
    out: str | Path,
    report: EvalReport | dict[str, Any],
    *,
    plots: bool = True,
    generations: list[dict] | None = None,
) -> list[Path]:
    """Write report.json, report.md, report.html and (optionally) the PNG plots atomically;
    return the paths.

    The plot file names are recorded in ``report.plots`` (an :class:`EvalReport` is updated in
    place). ``generations``: the reply records shown in report.html; default:
    ``out/generations.jsonl`` (written by ``run_eval``).
    """
    from rahf.evaluate.html_report import REPORT_HTML, read_generations, to_html

    report = as_report(report)
    out = Path(out)
    written = []
    images: dict[str, bytes] = {}
    if plots:
        from rahf.evaluate.plots import report_plots

        report.plots = []
        for name, png in report_plots(report).items():
            atomic_write_bytes(out / name, png)
            report.plots.append(name)
            written.append(out / name)
            images[name] = png
    atomic_write_json(out / REPORT_JSON, report.to_dict())
    atomic_write_text(out / REPORT_MD, to_markdown(report))
    records = read_generations(out) if generations is None else generations
    atomic_write_text(out / REPORT_HTML, to_html(report, records, images))
    return [out / REPORT_JSON, out / REPORT_MD, out / REPORT_HTML, *written]


def read_report(folder: str | Path) -> EvalReport:
    """The report.json of an evaluation folder (or the file itself)."""
    from rahf.config import ConfigError

    path = Path(folder)
    if path.is_dir():
        path = path / REPORT_JSON
    if not path.is_file():
        raise ConfigError(f"{path}: no such report (run `rahf eval ... --out DIR` first)")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err.msg})") from None
    if report.get("schema_version") != SCHEMA_VERSION:
        raise ConfigError(f"{path}: report schema {report.get('schema_version')}, expected {SCHEMA_VERSION}")
    try:
        return EvalReport.from_dict(report)
    except (KeyError, TypeError, AttributeError) as err:
        raise ConfigError(f"{path}: not a `rahf eval` report ({type(err).__name__}: {err})") from None


# ------------------------------------------------------------------ markdown


def fmt(estimate: Estimate | float | None, *, percent: bool = False) -> str:
    """``0.612 [0.570, 0.655]`` (or percentages), ``-`` for a missing number."""
    if estimate is None:
        return "-"
    if isinstance(estimate, (int, float)):
        return f"{estimate:.1%}" if percent else f"{estimate:.3g}"
    scale, pattern = (100, "{:.1f}") if percent else (1, "{:.3f}")
    text = pattern.format(estimate.value * scale)
    if estimate.low is not None and estimate.high is not None:
        text += f" [{pattern.format(estimate.low * scale)}, {pattern.format(estimate.high * scale)}]"
    return text


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Section:
    """One part of a report as plain strings: the markdown and the HTML report render the same."""

    title: str
    notes: list[str] = field(default_factory=list)
    tables: list[tuple[list[str], list[list[str]]]] = field(default_factory=list)
    after: list[str] = field(default_factory=list)  # lines under the tables


def title(report: EvalReport) -> str:
    model = report.models.get("model")
    return f"Evaluation of `{model.spec if model else '?'}`"


def sections(report: EvalReport) -> list[Section]:
    """The metric tables of a report, in reading order, then its provenance."""
    out = []
    if report.preference:
        out.append(Section(
            "Preference accuracy (held-out pairs, 95% bootstrap CI, %)",
            ["Share of pairs where the chosen reply has the higher mean token log-likelihood"
             " (summed: total log-likelihood). Mean-token margin: mean over pairs of l(y+) - l(y-), mean-token"
             " log-likelihoods; against `--baseline`, the same pairs' margin change, model minus baseline."
             " Implicit reward (needs `--reference`):"
             " (log p(y+) - log p_ref(y+)) - (log p(y-) - log p_ref(y-)), summed log-probs."],
            [(["data", "model", "pairs", "accuracy (mean log-lik)", "accuracy (summed)",
               "mean-token margin (nats)", "margin - baseline (paired)",
               "implicit-reward accuracy", "implicit margin (nats)"],
              [[e.source, e.model, e.n, fmt(e.accuracy, percent=True),
                fmt(e.accuracy_summed, percent=True), fmt(e.mean_token_margin),
                fmt(e.margin_vs_baseline), fmt(e.implicit_accuracy, percent=True),
                fmt(e.margin)] for e in report.preference])],
        ))
    if report.reward_model_accuracy:
        out.append(Section(
            "Reward-model accuracy on the pairs (%)", [],
            [(["data", "pairs", "RM accuracy", "longer reply wins"],
              [[e.source, e.n, fmt(e.accuracy, percent=True),
                fmt(e.longer_wins_accuracy, percent=True)] for e in report.reward_model_accuracy])],
        ))
    if report.generation:
        out.append(Section(
            "Generation and behaviour",
            ["Refusal rate is measured on harmful-request prompts, over-refusal on benign ones"
             " (keyword list in `rahf.evaluate.behaviour`)."],
            [(["prompts", "model", "replies", "mean reward", "tokens", "words", "hit limit",
               "4-gram repetition", "empty", "refusal (harmful)", "over-refusal (benign)", "offensive"],
              [[e.source, e.model, e.n_replies, fmt(e.mean_reward),
                f"{b.mean_tokens:.1f}", f"{b.mean_words:.1f}", _rate(b.hit_limit_rate),
                _rate(b.repetition_rate), _rate(b.empty_rate), _rate(b.refusal_rate),
                _rate(b.over_refusal_rate), _rate(b.offensive_rate)]
               for e in report.generation for b in [e.behaviour]])],
        ))
    if report.comparisons:
        out.append(Section(
            "Win rate of the model against the baseline (reward model judge, %)",
            ["Ties count 1/2. Length-controlled: logistic fit of the outcome on"
             " tanh(length difference / sd), read at equal length (AlpacaEval-style)."],
            [(["prompts", "win rate", "length-controlled", "wins / ties / losses",
               "mean reward (model)", "mean reward (baseline)"],
              [[e.source, fmt(e.win_rate, percent=True),
                fmt(e.length_controlled_win_rate, percent=True),
                f"{e.wins} / {e.ties} / {e.losses}", fmt(e.mean_score),
                fmt(e.baseline_mean_score)] for e in report.comparisons])],
        ))
    provenance = Section("Provenance", [], [(
        ["role", "spec", "path", "fingerprint"],
        [[role, m.spec, m.path, m.fingerprint[:16]] for role, m in report.models.items()],
    )])
    if report.data:
        provenance.tables.append((["data", "kind", "items", "invalid rows skipped", "sha256"],
                                  [[d.path, d.kind, d.n, sum(d.invalid.values()), (d.sha256 or "-")[:16]]
                                   for d in report.data]))
    provenance.after = footer(report)
    out.append(provenance)
    return out


def footer(report: EvalReport) -> list[str]:
    """Seed, device, versions and timing: the lines under the provenance tables."""
    env = report.environment
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items() if v)
    settings = report.settings
    return [
        f"Seed {settings.get('seed')}, {settings.get('resamples')} bootstrap resamples,"
        f" device {env.get('device')}, created {env.get('created')}.",
        f"Versions: {versions}.",
        "Timing (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report.timing.items()),
    ]


def to_markdown(report: EvalReport | dict[str, Any]) -> str:
    """The human-readable tables of a report."""
    report = as_report(report)
    parts = [f"# {title(report)}", ""]
    for section in sections(report):
        parts += [f"## {section.title}", ""]
        parts += [x for note in section.notes for x in (note, "")]
        parts += [x for header, rows in section.tables for x in (table(header, rows), "")]
        parts += [x for line in section.after for x in (line, "")]
    if report.plots:
        parts += ["## Plots", ""] + [f"![{name}]({name})" for name in report.plots] + [""]
    return "\n".join(parts)


# ------------------------------------------------------------------ compare


def comparison_rows(reports: dict[str, EvalReport]) -> tuple[list[str], list[list[str]]]:
    """One row per report: the model's accuracy per pairs file and win rates per prompt file."""
    pref_sources = sorted({e.source for r in reports.values() for e in r.preference})
    cmp_sources = sorted({e.source for r in reports.values() for e in r.comparisons})
    gen_sources = sorted({e.source for r in reports.values() for e in r.generation})
    header = ["report", "model"]
    header += [f"accuracy: {s}" for s in pref_sources]
    header += [f"{kind}: {s}" for s in cmp_sources for kind in ("win rate", "LC win rate")]
    header += [f"mean tokens: {s}" for s in gen_sources]
    rows = []
    for label, report in reports.items():
        pref = {e.source: e for e in report.preference if e.model == "model"}
        cmp = {e.source: e for e in report.comparisons}
        gen = {e.source: e for e in report.generation if e.model == "model"}
        row = [label, report.models["model"].spec]
        row += [fmt(pref[s].accuracy, percent=True) if s in pref else "-" for s in pref_sources]
        for s in cmp_sources:
            row += [fmt(cmp[s].win_rate, percent=True), fmt(cmp[s].length_controlled_win_rate, percent=True)] \
                if s in cmp else ["-", "-"]
        row += [f"{gen[s].behaviour.mean_tokens:.1f}" if s in gen else "-" for s in gen_sources]
        rows.append(row)
    return header, rows


def compare_reports(folders: list[str | Path], out: str | Path | None = None) -> str:
    """One table (returned as markdown) and, with ``out``, compare.md/compare.json/compare.png."""
    reports: dict[str, EvalReport] = {}
    for folder in folders:
        label = Path(folder).resolve().name
        while label in reports:  # two folders with the same name
            label += "'"
        reports[label] = read_report(folder)
    header, rows = comparison_rows(reports)
    text = table(header, rows)
    if out is not None:
        from rahf.evaluate.plots import compare_plot

        out = Path(out)
        atomic_write_bytes(out / "compare.png", compare_plot(reports))
        atomic_write_json(out / "compare.json", {"reports": {k: str(Path(f).resolve()) for k, f in zip(reports, folders, strict=True)},
                                                  "header": header, "rows": rows})
        atomic_write_text(out / "compare.md", "# Comparison\n\n" + text + "\n\n![compare](compare.png)\n")
    return text
