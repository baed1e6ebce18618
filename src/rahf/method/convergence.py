"""How far step 3 got: the share of the target reached per layer, and a plateau stop.

The fit moves the aligned model's hidden states h from A_o toward T = A_o + alpha * v. Per
target layer and real reply token, with d = T - A_o = alpha * v:

    achieved shift = <h - A_o, d> / ||d||^2      1.0: on the target along d; 0.0: not moved
    residual       = ||h - T|| / ||d||           0.0: exactly on the target

each averaged over real reply tokens (padding and tokens with d = 0 excluded).
:class:`ConvergenceLog` adds both per layer (``shift/L<l>``, ``residual/L<l>``) to each logged
step, measured on a few held-out examples; :class:`PlateauStop` ends training once the loss
stops improving. The plateau stop is off by default (``fit.plateau_window: 0``): a fixed step
budget keeps runs comparable at matched compute (the reference trains a fixed budget too) and
makes a resumed run end exactly where an uninterrupted one does; turn it on for long multi-epoch
fits on cached targets, where it saves the epochs that no longer move the loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import TrainerCallback

TINY = 1e-12


def target_progress(
    hidden: torch.Tensor, orig: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(achieved shift, residual)`` per layer, each (layers,).

    hidden, orig, target: (layers, batch, reply, hidden); mask: (batch, reply) bool.
    """
    step = (target - orig).float()
    norm2 = (step * step).sum(-1)  # (layers, batch, reply)
    shift = ((hidden - orig).float() * step).sum(-1) / norm2.clamp(min=TINY)
    residual = (hidden - target).float().norm(dim=-1) / norm2.sqrt().clamp(min=TINY)
    weights = (mask[None] & (norm2 > TINY)).float()
    count = weights.sum(dim=(1, 2)).clamp(min=1)
    return (shift * weights).sum(dim=(1, 2)) / count, (residual * weights).sum(dim=(1, 2)) / count


@torch.no_grad()
def measure_progress(trainer, examples: Sequence) -> dict[str, float]:
    """``{"shift/L<l>": ..., "residual/L<l>": ...}`` of ``trainer.model`` on ``examples``
    (FitExamples), with the targets computed from the frozen passes as the fit computes them;
    with ``fit.stop_weight``, also ``stop_kl``: how far the end-or-continue choice moved from
    the frozen model's on these held-out replies (the term the fit keeps small); with
    ``fit.anchor_weight``, also ``anchor_kl``: the next-token KL on the frozen model's own replies
    to these examples' prompts (generated once, then kept)."""
    from rahf.hidden_states import logits_at, predicting_mask, reply_hidden_states, reply_mask
    from rahf.method.fit import FitCollator, stop_kl
    from rahf.method.patterns import frozen_patterns

    model = trainer.model
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    weight = 0
    try:
        for start in range(0, len(examples), 8):
            part = list(examples[start : start + 8])
            batch = FitCollator(trainer.pad_id)(part)
            batch = {role: {k: v.to(device) for k, v in b.items()} for role, b in batch.items()}
            width = int(batch["orig"]["reply_len"].max())
            with trainer.autocast():
                patterns = frozen_patterns(trainer.frozen, trainer.source, batch, trainer.layers,
                                           pad_id=trainer.pad_id, truncate=True, batch_frozen=trainer.batch_frozen,
                                           share_prompt=getattr(trainer, "share_prompt", True))
                hidden = reply_hidden_states(model, batch["orig"], trainer.layers, reply_width=width, truncate=True)
            target = patterns["orig"] + trainer.alpha * (patterns["preferred"] - patterns["dispreferred"])
            shift, residual = target_progress(hidden, patterns["orig"], target, reply_mask(batch["orig"]["reply_len"], width))
            for layer, s, r in zip(trainer.layers, shift.tolist(), residual.tolist(), strict=True):
                sums[f"shift/L{layer}"] = sums.get(f"shift/L{layer}", 0.0) + s * len(part)
                sums[f"residual/L{layer}"] = sums.get(f"residual/L{layer}", 0.0) + r * len(part)
            if getattr(trainer, "stop_weight", 0.0) > 0:
                orig = batch["orig"]
                keep = predicting_mask(orig["reply_start"], orig["reply_len"], orig["input_ids"].shape[1])
                with trainer.autocast():
                    trained, frozen = logits_at(model, orig, keep), trainer.frozen_logits(orig, keep)
                sums["stop_kl"] = sums.get("stop_kl", 0.0) + stop_kl(frozen, trained, trainer.stop_ids).item() * len(part)
            if getattr(trainer, "anchor_weight", 0.0) > 0:
                with trainer.autocast():
                    anchor = trainer.anchor_kl(model, batch["orig"]).item()
                sums["anchor_kl"] = sums.get("anchor_kl", 0.0) + anchor * len(part)
            weight += len(part)
    finally:
        model.train(was_training)
    means = {k: v / max(weight, 1) for k, v in sums.items()}
    return {k: float(f"{v:.4g}") if k in ("stop_kl", "anchor_kl") else round(v, 4) for k, v in means.items()}  # ~1e-4


class ConvergenceLog(TrainerCallback):
    """At each logged step, add the achieved shift and residual per layer to the log record.

    Put it before ``LossLogCallback`` in the callback list so that record carries them; they are
    also written into the Trainer's ``log_history``, which checkpoints keep for a resumed run.
    Set ``trainer`` once the trainer exists.
    """

    def __init__(self, examples: Sequence) -> None:
        self.examples = list(examples)
        self.trainer = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs or not self.examples or self.trainer is None:
            return
        values = measure_progress(self.trainer, self.examples)
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)


class PlateauStop(TrainerCallback):
    """Stop training when the mean loss of the last ``window`` logged steps is less than
    ``threshold`` (relative) below the mean of the ``window`` before them.

    Means over windows, not two single logs, so one noisy batch does not end a fit. A checkpoint
    is saved at the stop; ``stopped_at`` records the step. A resumed run rebuilds the loss
    history from the checkpoint's log.
    """

    def __init__(self, window: int, threshold: float) -> None:
        self.window, self.threshold = window, threshold
        self.losses: list[float] = []
        self.stopped_at: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.losses = [r["loss"] for r in state.log_history if "loss" in r]

    def improvement(self) -> float | None:
        """Relative improvement of the last window over the one before (None: too few logs)."""
        w = self.window
        if w < 1 or len(self.losses) < 2 * w:
            return None
        before = sum(self.losses[-2 * w : -w]) / w
        after = sum(self.losses[-w:]) / w
        return (before - after) / max(abs(before), TINY)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        self.losses.append(float(logs["loss"]))
        gain = self.improvement()
        if gain is not None and gain < self.threshold and state.global_step < state.max_steps:
            self.stopped_at = state.global_step
            control.should_training_stop = True
            control.should_save = True
            print(f"rahf: fit loss plateaued at step {state.global_step} (last {self.window} logs improved"
                  f" {100 * gain:.2f}% < fit.plateau_threshold {100 * self.threshold:g}%); stopping")


def progress_line(progress: dict[str, float]) -> str:
    """``L4 0.83 (residual 0.40), L6 ...`` from :func:`measure_progress`'s dict."""
    layers = [k.split("/L", 1)[1] for k in progress if k.startswith("shift/")]
    return ", ".join(f"L{lay} {progress[f'shift/L{lay}']:.2f} (residual {progress[f'residual/L{lay}']:.2f})" for lay in layers)


def held_out_examples(config, validation: Sequence, examples: Sequence, tokenizer) -> tuple[list, str]:
    """Up to ``fit.convergence_examples`` fit examples built from validation pairs (the fit never
    trains on them), or from the fit's own examples when there is no validation split."""
    from rahf.method.patterns import fit_examples

    n = config.fit.convergence_examples
    if n == 0:
        return [], "none"
    if validation:
        return fit_examples(list(validation)[:n], tokenizer, config)[:n], "validation"
    return list(examples)[:n], "training"


def check_lines(config, readiness: Sequence, fit_result: dict, data_stats: dict | None = None) -> list[str]:
    """Model-card lines: which pairs fed which step, how well step 1 separated on held-out
    pairs, and how much of the target step 3 reached."""
    lines = []
    if data_stats and "step1" in data_stats:
        lines.append(f"Training pairs split by prompt (patterns.disjoint_share={config.patterns.disjoint_share}):"
                     f" {data_stats['step1']} train step 1, the other {data_stats['patterns']} feed steps 2-3.")
    if readiness:
        final = readiness[-1]
        verdict = "separated" if final.separated else "**not separated** (the interval reaches 0)"
        lines.append(
            f"Step-1 readiness on {final.signal.n} held-out pairs ({final.source}), after {final.steps} steps:"
            f" {final.label} = {final.signal_text} nats (mean-token log-likelihoods, 95% bootstrap CI): {verdict}."
        )
        if config.step1.until_separated and len(readiness) > 1:
            lines.append(f"Step 1 was trained on in chunks (step1.until_separated): measured at "
                         f"{', '.join(str(r.steps) for r in readiness)} steps.")
    progress = fit_result.get("convergence")
    if progress:
        lines.append(
            f"Step 3 reached, per target layer, this share of its target on {progress['examples']} {progress['source']}"
            f" examples (mean achieved shift, 1.0 = on target; residual ||h - T|| / ||alpha v||): {progress_line(progress)}."
        )
        if "stop_kl" in progress:
            lines.append(f"Length control (fit.stop_weight={config.fit.stop_weight}): the end-or-continue choice moved"
                         f" {progress['stop_kl']:.2e} nats per reply token (KL from the frozen model) on those examples.")
        if "anchor_kl" in progress:
            lines.append(f"On-policy anchor (fit.anchor_weight={config.fit.anchor_weight}): on the frozen model's own replies"
                         f" to those prompts the next-token distribution moved {progress['anchor_kl']:.2e} nats per token.")
    if fit_result.get("plateau_stop"):
        lines.append(f"Step 3 stopped at step {fit_result['plateau_stop']}: its loss plateaued (fit.plateau_window).")
    return lines


def checks_records(readiness: Sequence, fit_result: dict) -> list[dict]:
    """``metrics.jsonl`` records of the checks (stage ``readiness`` per measurement; ``fit_convergence``)."""
    records = [{"stage": "readiness", "step": r.steps, **r.to_dict()} for r in readiness]
    if fit_result.get("convergence"):
        records.append({"stage": "fit_convergence", "step": fit_result.get("steps"), **fit_result["convergence"]})
    return records
