"""``report.json`` as dataclasses: what ``run_eval`` fills, and what ``report.md``, ``report.html``,
the plots and ``rahf eval compare`` read back.

``EvalReport.to_dict()`` is the report.json object; ``EvalReport.from_dict()`` reads one back.
Layout (``SCHEMA_VERSION``)::

    settings      the EvalConfig, as given
    environment   python/torch/transformers/... versions, device, time
    models        role (MODEL_ROLES) -> spec, path, base, fingerprint; the model's steer, if any
    data          one entry per file: path, sha256, format, n, invalid-row counts
    preference    per (pairs file, role): n, accuracy, accuracy_summed, implicit_accuracy, margin,
                  mean_token_margin, pair_margins (per pair), margin_vs_baseline (model's entry)
    reward_model_accuracy  per pairs file: the RM's accuracy and "longer wins" on those pairs
    generation    per (prompt file, role): behaviour metrics, mean reward, per-reply rewards/lengths
    comparisons   per prompt file: model vs baseline win rate, LC win rate, mean rewards, W/T/L
    timing        seconds per stage
    plots         PNG file names (set by ``write_report``)

An estimate is ``{"value", "low", "high", "n"}`` (95% bootstrap interval). Fields added after
schema 1 first shipped (``mean_token_margin``, ``pair_margins``, ``margin_vs_baseline``, a
model's ``steer``) are written only when set, so older reports read back and round-trip unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from rahf.evaluate.behaviour import BehaviourStats
from rahf.evaluate.stats import Estimate

if TYPE_CHECKING:  # preference.py loads torch; `rahf eval compare` only reads numbers
    from rahf.evaluate.preference import PreferenceResult

SCHEMA_VERSION = 1
# Who a model is in a report, in display order (not chat roles: those are rahf.data.formats.ROLES).
MODEL_ROLES = ("model", "baseline", "reference", "reward_model")


def _estimate(data: Mapping | None) -> Estimate | None:
    return None if data is None else Estimate.from_dict(dict(data))


def _plain(estimate: Estimate | None) -> dict | None:
    return None if estimate is None else estimate.to_dict()


def _with_optional(out: dict[str, Any], **optional: Any) -> dict[str, Any]:
    """``out`` plus each optional field that is set (see the module docstring)."""
    return out | {k: v for k, v in optional.items() if v is not None}


@dataclass
class ModelEntry:
    """Which weights a role was: for provenance and the generation-cache identity."""

    spec: str
    path: str
    base: str | None
    fingerprint: str
    steer: dict[str, Any] | None = None  # the evaluated model's vector: file, strength, layers

    def to_dict(self) -> dict[str, Any]:
        out = {"spec": self.spec, "path": self.path, "base": self.base, "fingerprint": self.fingerprint}
        return _with_optional(out, steer=self.steer)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelEntry:
        return cls(**data)


@dataclass
class DataEntry:
    """One input file: where it was, what it held, how many rows were skipped and why."""

    path: str
    source: str  # parent/name, the label used in every table
    kind: str  # "pairs", "prompts" or "harmful prompts"
    sha256: str | None
    format: str
    n: int
    invalid: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataEntry:
        return cls(**data)


@dataclass
class PreferenceEntry:
    """One evaluated model on one pairs file (``rahf.evaluate.preference`` defines each number)."""

    source: str
    model: str  # the role
    n: int
    accuracy: Estimate
    accuracy_summed: Estimate
    implicit_accuracy: Estimate | None = None
    margin: Estimate | None = None
    mean_token_margin: Estimate | None = None
    pair_margins: list[float] | None = None
    margin_vs_baseline: Estimate | None = None  # the model's entry, when a baseline was scored

    def to_dict(self) -> dict[str, Any]:
        out = {"source": self.source, "model": self.model, "n": self.n, "accuracy": self.accuracy.to_dict(),
               "accuracy_summed": self.accuracy_summed.to_dict(),
               "implicit_accuracy": _plain(self.implicit_accuracy), "margin": _plain(self.margin)}
        return _with_optional(out, mean_token_margin=_plain(self.mean_token_margin), pair_margins=self.pair_margins,
                              margin_vs_baseline=_plain(self.margin_vs_baseline))

    @classmethod
    def from_result(cls, source: str, role: str, result: PreferenceResult) -> PreferenceEntry:
        """The entry of one ``preference_accuracy`` result (pair margins rounded as report.json keeps them)."""
        return cls.from_dict({"source": source, "model": role, **result.to_dict()})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreferenceEntry:
        estimates = ("accuracy", "accuracy_summed", "implicit_accuracy", "margin", "mean_token_margin",
                     "margin_vs_baseline")
        return cls(**{k: _estimate(v) if k in estimates else v for k, v in data.items()})


@dataclass
class RewardModelAccuracyEntry:
    """The reward model's own accuracy on one pairs file, next to "the longer reply wins"."""

    source: str
    n: int
    accuracy: Estimate
    longer_wins_accuracy: Estimate
    mean_margin: float

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "n": self.n, "accuracy": self.accuracy.to_dict(),
                "longer_wins_accuracy": self.longer_wins_accuracy.to_dict(), "mean_margin": self.mean_margin}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RewardModelAccuracyEntry:
        return cls(data["source"], data["n"], _estimate(data["accuracy"]), _estimate(data["longer_wins_accuracy"]),
                   data["mean_margin"])


@dataclass
class GenerationEntry:
    """One evaluated model's replies to one prompt file: behaviour and (with an RM) rewards."""

    source: str
    model: str
    n_items: int
    n_replies: int  # one per turn: MT-Bench items have several
    behaviour: BehaviourStats
    lengths_chars: list[int]
    mean_reward: Estimate | None = None
    rewards: list[float] | None = None  # per reply, in generations.jsonl order

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "model": self.model, "n_items": self.n_items, "n_replies": self.n_replies,
                "behaviour": self.behaviour.to_dict(), "lengths_chars": self.lengths_chars,
                "mean_reward": _plain(self.mean_reward), "rewards": self.rewards}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenerationEntry:
        return cls(**{**data, "behaviour": BehaviourStats(**data["behaviour"]),
                      "mean_reward": _estimate(data.get("mean_reward"))})


@dataclass
class ComparisonEntry:
    """Model against baseline on one prompt file, judged by the reward model (ties count 1/2)."""

    source: str
    mean_score: Estimate
    baseline_mean_score: Estimate
    win_rate: Estimate
    length_controlled_win_rate: Estimate
    wins: int
    ties: int
    losses: int

    def to_dict(self) -> dict[str, Any]:
        return {k: v.to_dict() if isinstance(v, Estimate) else v for k, v in vars(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ComparisonEntry:
        return cls(**{k: _estimate(v) if isinstance(v, Mapping) else v for k, v in data.items()})


@dataclass
class EvalReport:
    """Everything one ``rahf eval`` measured; ``to_dict()`` is report.json."""

    settings: dict[str, Any]
    environment: dict[str, Any]
    models: dict[str, ModelEntry] = field(default_factory=dict)  # role -> entry
    data: list[DataEntry] = field(default_factory=list)
    preference: list[PreferenceEntry] = field(default_factory=list)
    reward_model_accuracy: list[RewardModelAccuracyEntry] = field(default_factory=list)
    generation: list[GenerationEntry] = field(default_factory=list)
    comparisons: list[ComparisonEntry] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)  # seconds per stage
    plots: list[str] | None = None  # PNG names, set by write_report
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        out = {
            "schema_version": self.schema_version,
            "settings": self.settings,
            "environment": self.environment,
            "models": {role: m.to_dict() for role, m in self.models.items()},
            **{name: [e.to_dict() for e in getattr(self, name)]
               for name in ("data", "preference", "reward_model_accuracy", "generation", "comparisons")},
            "timing": self.timing,
        }
        return _with_optional(out, plots=self.plots)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalReport:
        """Read a report.json object (``KeyError`` / ``TypeError`` on one that is not a report)."""
        return cls(
            schema_version=data.get("schema_version", SCHEMA_VERSION),
            settings=dict(data.get("settings", {})),
            environment=dict(data.get("environment", {})),
            models={role: ModelEntry.from_dict(m) for role, m in data.get("models", {}).items()},
            data=[DataEntry.from_dict(e) for e in data.get("data", [])],
            preference=[PreferenceEntry.from_dict(e) for e in data.get("preference", [])],
            reward_model_accuracy=[RewardModelAccuracyEntry.from_dict(e) for e in data.get("reward_model_accuracy", [])],
            generation=[GenerationEntry.from_dict(e) for e in data.get("generation", [])],
            comparisons=[ComparisonEntry.from_dict(e) for e in data.get("comparisons", [])],
            timing=dict(data.get("timing", {})),
            plots=data.get("plots"),
        )


def as_report(report: EvalReport | Mapping[str, Any]) -> EvalReport:
    """An :class:`EvalReport`, from itself or from a report.json dict."""
    return report if isinstance(report, EvalReport) else EvalReport.from_dict(report)
