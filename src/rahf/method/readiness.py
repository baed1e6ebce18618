"""Step-1 readiness: does step 1 separate preferred from dispreferred on pairs it never saw?

Step 3 can only transfer what step 1 learnt (docs/method.md, "Which pairs feed which step"). With
``m(y+, y-) = l(y+) - l(y-)``, the chosen-minus-rejected margin of mean-token reply
log-likelihoods (nats, as ``bench/dual_diagnosis.py``), the signal per held-out pair is

    Dual:  m under M+  -  m under M-
    SCIT:  m under M_s with I+  -  m under M_s with I-

reported as its mean with a seeded 95% bootstrap interval. Step 1 *separates* when the interval's
lower bound is above 0. SCIT also reports M_s without instruction minus the base (what step 3
starts from). Cost: Dual scores each pair's two replies under M+ and M- (4 sequences a pair),
SCIT under M_s three ways and the base (8); ``step1.readiness_pairs`` bounds it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rahf.config import AlignConfig
from rahf.data.schema import PreferencePair
from rahf.evaluate.scoring import score_pairs
from rahf.evaluate.stats import Estimate, bootstrap
from rahf.trainer import use_bf16

if TYPE_CHECKING:
    from rahf.plan import RunPlan


@dataclass
class Readiness:
    """The readiness signal of one step-1 state, with side numbers (all in nats)."""

    method: str
    source: str  # which held-out pairs: "patterns half" or "validation split"
    steps: int  # step-1 optimizer steps (per side for Dual)
    signal: Estimate
    extra: dict[str, Estimate] = field(default_factory=dict)

    @property
    def separated(self) -> bool:
        return self.signal.low is not None and self.signal.low > 0

    @property
    def label(self) -> str:
        from rahf.method import method_for

        return method_for(self.method).readiness_label

    @property
    def signal_text(self) -> str:
        return _signed(self.signal)

    def line(self) -> str:
        verdict = "separated" if self.separated else "NOT separated (95% CI reaches 0)"
        side = "; ".join(f"{name} {_signed(e)}" for name, e in self.extra.items())
        return (
            f"rahf: step-1 readiness after {self.steps} steps ({self.signal.n} held-out pairs, {self.source}):"
            f" {self.label} = {_signed(self.signal)} nats: {verdict}" + (f" [{side}]" if side else "")
        )

    def to_dict(self) -> dict:
        return {
            "method": self.method, "source": self.source, "steps": self.steps, "separated": self.separated,
            "signal": self.signal.to_dict(), "extra": {k: v.to_dict() for k, v in self.extra.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> Readiness:
        return cls(
            data["method"], data["source"], data["steps"], Estimate.from_dict(data["signal"]),
            {k: Estimate.from_dict(v) for k, v in data.get("extra", {}).items()},
        )


def _signed(e: Estimate) -> str:
    if e.low is None or e.high is None:
        return f"{e.value:+.3f}"
    return f"{e.value:+.3f} [{e.low:+.3f}, {e.high:+.3f}]"


def held_out_pairs(
    patterns: Sequence[PreferencePair], validation: Sequence[PreferencePair], config: AlignConfig
) -> tuple[list[PreferencePair], str]:
    """Up to ``step1.readiness_pairs`` pairs step 1 did not train on, in a seeded draw: the
    patterns half when the halves are disjoint, else the validation split."""
    pool, source = (
        (list(patterns), "patterns half") if config.patterns.disjoint_share > 0 else (list(validation), "validation split")
    )
    n = config.step1.readiness_pairs
    if len(pool) > n:
        keep = sorted(random.Random(config.seed).sample(range(len(pool)), n))
        pool = [pool[i] for i in keep]
    return pool, source


def margins(model: torch.nn.Module, tokenizer, pairs: Sequence[PreferencePair], config: AlignConfig, *,
            instruction: str | None = None) -> torch.Tensor:
    """Per pair ``l(y+) - l(y-)`` (mean-token log-likelihoods) under ``model``, in the run's
    training precision (bf16 autocast where :func:`rahf.trainer.use_bf16` says so)."""
    scores = score_pairs(
        model, tokenizer, pairs, instruction=instruction, max_prompt_tokens=config.max_prompt_tokens,
        max_reply_tokens=config.reply_window, progress=False, bf16=use_bf16(config),
    )
    return (scores.chosen_mean - scores.rejected_mean).double()


def _estimate(values: torch.Tensor, seed: int) -> Estimate:
    return bootstrap(values.numpy(), seed=seed)


def dual_readiness(
    plan: RunPlan, pairs: Sequence[PreferencePair], step1: dict[str, str], *, source: str, steps: int
) -> Readiness:
    """M+ vs M- on ``pairs``; ``step1`` maps each side to its stage folder (``adapter/`` or ``merged/``)."""
    from peft import PeftModel

    config, tokenizer = plan.config, plan.tokenizer

    def load(path: str | None = None):
        return plan.load_model(path).eval()

    base = load()
    adapters = {side: Path(folder) / "adapter" for side, folder in step1.items()}
    if all(path.is_dir() for path in adapters.values()):
        model = PeftModel.from_pretrained(base, str(adapters["preferred"]), adapter_name="preferred")
        model.load_adapter(str(adapters["dispreferred"]), adapter_name="dispreferred")
        model.eval()
        side_margins = {}
        for side in ("preferred", "dispreferred"):
            model.set_adapter(side)
            side_margins[side] = margins(model, tokenizer, pairs, config)
    else:  # merged copies (dual_storage full-copies, full fine-tuning): one model at a time
        del base
        side_margins = {side: margins(load(str(Path(step1[side]) / "merged")), tokenizer, pairs, config)
                        for side in ("preferred", "dispreferred")}
    signal = side_margins["preferred"] - side_margins["dispreferred"]
    return Readiness("dual", source, steps, _estimate(signal, config.seed))


def scit_readiness(
    plan: RunPlan, pairs: Sequence[PreferencePair], step1: str, *, source: str, steps: int
) -> Readiness:
    """M_s under I+ vs under I- on ``pairs``; ``step1`` is the SCIT stage folder (``merged/``)."""
    config, tokenizer = plan.config, plan.tokenizer
    model = plan.load_model(str(Path(step1) / "merged")).eval()
    plus = margins(model, tokenizer, pairs, config, instruction=config.preferred_instruction)
    minus = margins(model, tokenizer, pairs, config, instruction=config.dispreferred_instruction)
    plain = margins(model, tokenizer, pairs, config)
    del model
    base = margins(plan.load_model().eval(), tokenizer, pairs, config)
    extra = {"M_s - base (no instruction)": _estimate(plain - base, config.seed)}
    return Readiness("scit", source, steps, _estimate(plus - minus, config.seed), extra)


def not_separated_line(result: Readiness, config: AlignConfig) -> str:
    """The one line said when step 1 reached its cap without separating."""
    from rahf.method import method_for

    then = "fitting anyway" if config.step1.on_not_separated == "continue" else "stopping"
    return (
        f"rahf: step 1 did not separate within step1.max_steps_cap={config.step1.max_steps_cap} steps"
        f" ({result.label} = {_signed(result.signal)} nats after {result.steps}): raise step1.max_steps_cap or"
        f" step1.train.learning_rate{method_for(config).not_separated_hint};"
        f" {then} (step1.on_not_separated={config.step1.on_not_separated})"
    )


def train_until_separated(
    train_to: Callable[[int | None], int],
    measure: Callable[[int], Readiness],
    *,
    until: bool,
    chunk: int,
    cap: int,
) -> list[Readiness]:
    """Train step 1, measure; with ``until``, train on ``chunk`` more steps at a time until the
    signal separates or ``cap`` steps are reached. Returns every measurement, in order.

    ``train_to(target)`` trains (or resumes) step 1 up to ``target`` steps (None: the configured
    budget) and returns the steps it now has; ``measure(steps)`` scores that state.
    """
    history = [measure(train_to(None))]
    while until and not history[-1].separated and history[-1].steps < cap:
        history.append(measure(train_to(min(history[-1].steps + chunk, cap))))
    return history
