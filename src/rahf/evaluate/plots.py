"""PNG plots of a report, drawn from report.json alone (so they can be redrawn at any time).

Figures are built with ``matplotlib.figure.Figure`` (no pyplot global state, no display needed)
and returned as PNG bytes; the caller writes them atomically. Error bars are the 95% bootstrap
intervals stored with every estimate.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure

from rahf.evaluate.schema import EvalReport
from rahf.evaluate.stats import Estimate

COLOURS = {"model": "#1f77b4", "baseline": "#ff7f0e"}


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _errors(estimates: list[Estimate | None]) -> tuple[np.ndarray, np.ndarray]:
    """Values and (2, n) asymmetric error-bar lengths (0 where no interval)."""
    values = np.array([e.value if e else np.nan for e in estimates], dtype=float)
    low = np.array([e.value - e.low if e and e.low is not None else 0 for e in estimates])
    high = np.array([e.high - e.value if e and e.high is not None else 0 for e in estimates])
    return values, np.stack([low, high])


def _grouped_bars(ax, groups: list[str], series: dict[str, list[Estimate | None]], *, colours=None) -> None:
    x = np.arange(len(groups))
    width = 0.8 / max(len(series), 1)
    for k, (label, estimates) in enumerate(series.items()):
        values, errors = _errors(estimates)
        offset = (k - (len(series) - 1) / 2) * width
        colour = (colours or {}).get(label)
        ax.bar(x + offset, values, width, yerr=errors, capsize=3, label=label, color=colour)
    ax.set_xticks(x)
    ax.set_xticklabels(groups, rotation=15, ha="right")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides a bar


def preference_plot(report: EvalReport) -> bytes | None:
    """Preference accuracy per data source, one bar per model, with intervals; chance at 0.5."""
    entries = report.preference
    if not entries:
        return None
    sources = list(dict.fromkeys(e.source for e in entries))
    roles = list(dict.fromkeys(e.model for e in entries))
    by_key = {(e.source, e.model): e for e in entries}

    def column(role: str, name: str) -> list[Estimate | None]:
        return [getattr(by_key[(s, role)], name) if (s, role) in by_key else None for s in sources]

    series = {}
    for role in roles:
        series[f"{role} (mean log-lik)"] = column(role, "accuracy")
        if any(column(role, "implicit_accuracy")):
            series[f"{role} (implicit reward)"] = column(role, "implicit_accuracy")
    fig = Figure(figsize=(1.8 + 1.6 * len(sources) * max(1, len(series) / 2), 3.6))
    ax = fig.subplots()
    _grouped_bars(ax, sources, series)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_ylim(0, 1)
    ax.set_ylabel("preference accuracy")
    ax.set_title("Chosen reply preferred (95% bootstrap CI)")
    return _png(fig)


def score_distribution_plot(report: EvalReport) -> bytes | None:
    """Histogram of reward-model scores, model vs baseline, one panel per prompt file."""
    entries = [e for e in report.generation if e.rewards]
    if not entries:
        return None
    sources = list(dict.fromkeys(e.source for e in entries))
    fig = Figure(figsize=(4.2 * len(sources), 3.4))
    axes = np.atleast_1d(fig.subplots(1, len(sources)))
    for ax, source in zip(axes, sources, strict=True):
        chosen = [e for e in entries if e.source == source]
        all_scores = np.concatenate([np.asarray(e.rewards, dtype=float) for e in chosen])
        bins = np.histogram_bin_edges(all_scores, bins=min(30, max(5, len(all_scores) // 4)))
        for e in chosen:
            ax.hist(e.rewards, bins=bins, alpha=0.55, label=f"{e.model} (mean {np.mean(e.rewards):.2f})",
                    color=COLOURS.get(e.model))
        ax.set_title(source, fontsize=9)
        ax.set_xlabel("reward")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("replies")
    return _png(fig)


def win_rate_plot(report: EvalReport) -> bytes | None:
    """Raw and length-controlled win rate of the model over the baseline per prompt file."""
    entries = report.comparisons
    if not entries:
        return None
    sources = [e.source for e in entries]
    series: dict[str, list[Estimate | None]] = {
        "win rate": [e.win_rate for e in entries],
        "length-controlled": [e.length_controlled_win_rate for e in entries],
    }
    fig = Figure(figsize=(2.2 + 1.8 * len(sources), 3.4))
    ax = fig.subplots()
    _grouped_bars(ax, sources, series)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate vs baseline")
    ax.set_title("Model vs baseline, reward-model judge (95% CI)")
    return _png(fig)


def report_plots(report: EvalReport) -> dict[str, bytes]:
    """File name -> PNG bytes for every plot the report has data for."""
    plots = {
        "preference_accuracy.png": preference_plot(report),
        "score_distributions.png": score_distribution_plot(report),
        "win_rates.png": win_rate_plot(report),
    }
    return {name: png for name, png in plots.items() if png is not None}


def compare_plot(reports: dict[str, EvalReport]) -> bytes:
    """One figure for several reports: the model's accuracy per pairs file and win rates."""
    metrics: dict[str, dict[str, Estimate | None]] = {}  # metric -> report label -> estimate
    for label, report in reports.items():
        for e in report.preference:
            if e.model == "model":
                metrics.setdefault(f"accuracy\n{e.source}", {})[label] = e.accuracy
        for e in report.comparisons:
            metrics.setdefault(f"win rate\n{e.source}", {})[label] = e.win_rate
            metrics.setdefault(f"LC win rate\n{e.source}", {})[label] = e.length_controlled_win_rate
    groups = list(metrics) or ["(no numbers)"]
    series = {label: [metrics.get(g, {}).get(label) for g in groups] for label in reports}
    fig = Figure(figsize=(2.0 + 1.5 * len(groups) * max(1, len(reports) / 3), 3.8))
    ax = fig.subplots()
    _grouped_bars(ax, groups, series)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_ylim(0, 1)
    ax.set_title("Reports compared (95% bootstrap CI)")
    return _png(fig)
