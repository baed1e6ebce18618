"""The RAHF method (docs/method.md), one module per step, in order:

    step1_scit.py        step 1a: contrastive instruction tuning of one model (M_s)
    step1_dual.py        step 1b: a preferred and a dispreferred model (M+, M-)
    step1_objectives.py  step 1b with ``step1.objective: preference`` (DPO per side)
    readiness.py         does step 1 separate on held-out pairs? (the check before step 3)
    step1.py             step 1 as run stages, with the readiness check (and train-on-until)
    patterns.py          step 2: pattern sources, frozen passes, targets T = A_o + alpha * v
    targets.py           step 2: targets computed once and cached on disk
    fit.py               step 3: the fitting loss, its trainer and the fit stage
    convergence.py       step 3: how much of the target the fit reached; plateau stop

SCIT and Dual differ in step 1 and in where step 2's activations come from; everything that
differs sits behind :class:`Method`, and :func:`method_for` is the only place the config's
``method`` string is read. This module imports no torch, so the config can ask it for defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

if TYPE_CHECKING:
    from rahf.config import AlignConfig
    from rahf.method.patterns import PatternSource
    from rahf.method.readiness import Readiness
    from rahf.plan import RunPlan
    from rahf.runs import RunDir

MethodName = Literal["scit", "dual"]
SIDES = ("preferred", "dispreferred")


class Method:
    """What SCIT and Dual each decide: step 1's stages, step 2's pattern source, step 3's weights."""

    name: ClassVar[str]
    step1_stages: ClassVar[tuple[str, ...]]  # run-folder stages of step 1
    reply_window: ClassVar[int]  # default reply window in tokens (docs/method.md, step 3)
    pattern_reply: ClassVar[str]  # default reply the patterns are read on (docs/method.md, step 2)
    step1_examples_per_pair: ClassVar[int]  # training examples a pair gives one step-1 stage
    step1_steps_label: ClassVar[str]  # how the dry-run plan names step 1's step count
    instructed: ClassVar[bool]  # step 1 puts an instruction before every prompt
    readiness_label: ClassVar[str]  # what the readiness signal measures
    not_separated_hint: ClassVar[str] = ""  # extra advice when step 1 does not separate

    def fit_weight_copies(self, config: AlignConfig) -> int:
        """Full copies of the weights step 3 holds (for the memory estimate)."""
        return 1

    def step1_folders(self, run: RunDir) -> dict[str, str]:
        """Step-1 folders the fit loads beside its base weights (Dual: one per side)."""
        return {}

    def train_step1(self, plan: RunPlan, stage: str, pairs: list, out: Path) -> dict:
        raise NotImplementedError

    def readiness(self, plan: RunPlan, run: RunDir, pairs: list, *, source: str, steps: int) -> Readiness:
        raise NotImplementedError

    def fit_weights(self, plan: RunPlan, run: RunDir) -> str:
        """The weights step 3's adapter applies to."""
        raise NotImplementedError

    def fit_source(self, config: AlignConfig) -> PatternSource:
        """Where the fit's A_o, A_+ and A_- come from."""
        raise NotImplementedError

    def reading_source(self, config: AlignConfig) -> PatternSource:
        """Step 1's preferred vs dispreferred side, as the steering readers read them."""
        return self.fit_source(config)

    def load_fit_models(self, plan: RunPlan, base: str, run: RunDir) -> tuple[Any, Any]:
        """``(model with a fresh fitting adapter, ModelStates of the frozen passes)``."""
        from rahf.method.fit import load_fit_model

        return load_fit_model(plan.config, base, self.step1_folders(run), plan.layers)


class Scit(Method):
    """Step 1a: one model M_s; its patterns contrast the preferred and dispreferred instruction."""

    name = "scit"
    step1_stages = ("step1",)
    reply_window = 512
    pattern_reply = "random"
    step1_examples_per_pair = 2  # (I+, x, y+) and (I-, x, y-)
    step1_steps_label = "step1"
    instructed = True
    readiness_label = "margin under I+ - margin under I-"

    def train_step1(self, plan: RunPlan, stage: str, pairs: list, out: Path) -> dict:
        from rahf.method.step1_scit import train_scit

        return train_scit(plan, pairs, out)

    def readiness(self, plan: RunPlan, run: RunDir, pairs: list, *, source: str, steps: int) -> Readiness:
        from rahf.method.readiness import scit_readiness

        return scit_readiness(plan, pairs, str(run.stage("step1")), source=source, steps=steps)

    def fit_weights(self, plan: RunPlan, run: RunDir) -> str:
        return str((run.stage("step1") / "merged").resolve())

    def fit_source(self, config: AlignConfig) -> PatternSource:
        from rahf.method.patterns import instruction_contrast

        return instruction_contrast(config.preferred_instruction, config.dispreferred_instruction, name="scit")


class Dual(Method):
    """Step 1b: M+ and M- (two adapters on one base by default); patterns contrast the two."""

    name = "dual"
    step1_stages = ("step1_preferred", "step1_dispreferred")
    reply_window = 64
    pattern_reply = "both"
    step1_examples_per_pair = 1
    step1_steps_label = "step1 (each side)"
    instructed = False
    readiness_label = "M+ margin - M- margin"
    not_separated_hint = ", or try step1.objective=preference"

    def fit_weight_copies(self, config: AlignConfig) -> int:
        """The base plus, with ``step1.dual_storage: full-copies``, the two step-1 models."""
        return 3 if config.step1.dual_storage == "full-copies" else 1

    def step1_folders(self, run: RunDir) -> dict[str, str]:
        return {side: str(run.stage(f"step1_{side}")) for side in SIDES}

    def train_step1(self, plan: RunPlan, stage: str, pairs: list, out: Path) -> dict:
        from rahf.method.step1_dual import train_side

        return train_side(plan, pairs, stage.removeprefix("step1_"), out)

    def readiness(self, plan: RunPlan, run: RunDir, pairs: list, *, source: str, steps: int) -> Readiness:
        from rahf.method.readiness import dual_readiness

        return dual_readiness(plan, pairs, self.step1_folders(run), source=source, steps=steps)

    def fit_weights(self, plan: RunPlan, run: RunDir) -> str:
        """The original model, or M+ merged with ``patterns.align_target: preferred``."""
        if plan.config.patterns.align_target == "preferred":
            return str((run.stage("step1_preferred") / "merged").resolve())
        return plan.model_path

    def fit_source(self, config: AlignConfig) -> PatternSource:
        from rahf.method.patterns import dual_source

        return dual_source(config.patterns.align_target, config.preferred_instruction)

    def reading_source(self, config: AlignConfig) -> PatternSource:
        """M+ vs M-, no instruction, whatever ``patterns.align_target``."""
        from rahf.method.patterns import dual_source

        return dual_source("base", config.preferred_instruction)

    def load_fit_models(self, plan: RunPlan, base: str, run: RunDir) -> tuple[Any, Any]:
        if plan.config.patterns.align_target == "preferred":
            from rahf.method.step1_dual import load_preferred_target

            return load_preferred_target(plan, base, self.step1_folders(run))
        return super().load_fit_models(plan, base, run)


METHODS: dict[str, type[Method]] = {"scit": Scit, "dual": Dual}


def method_for(config: AlignConfig | str) -> Method:
    """The method a config (or a method name) asks for: the only switch on the method string."""
    name = config if isinstance(config, str) else config.method
    if name not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {name!r}")
    return METHODS[name]()
