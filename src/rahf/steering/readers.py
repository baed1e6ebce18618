"""Pattern readers: where a preferred and a dispreferred activity pattern come from.

Every source sits behind one interface, :class:`PatternReader`: ``read(pairs, layers)`` returns
:class:`Patterns`, the reply-token mean of ``hidden_states[l]`` for each example under the
preferred and the dispreferred side. An example is one (prompt, reply) with the same reply
tokens on both sides (``rahf.data.render`` tokenises replies on their own), so the difference
isolates the side. Which reply of each pair: ``Windows.replies`` (one at random by default;
``both`` doubles the cost).

* :class:`InstructionContrast`: the model itself under I+ vs I- (no training; RepE's reading
  vectors, and RAHF-SCIT's patterns before step 1).
* :func:`run_reader`: the step-1 models of a ``rahf align`` run, as step 2 builds them
  (``rahf.patterns.scit_passes``, ``rahf.fitting.load_fit_model``): Dual, the preferred vs
  the dispreferred adapter with no instruction; SCIT, the step-1 model under I+ vs I-.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from rahf.data.render import encode
from rahf.data.schema import PreferencePair
from rahf.patterns import pattern_replies
from rahf.plumbing import pad_batch, reply_hidden_states, reply_mask, unwrap


@dataclass
class Patterns:
    """Reply-mean hidden states per layer and example, for both sides."""

    layers: list[int]  # hidden_states indices
    preferred: torch.Tensor  # (layers, examples, hidden), float32
    dispreferred: torch.Tensor  # (layers, examples, hidden)
    token_norm: torch.Tensor  # (layers,): mean L2 norm of one reply token's state, both sides
    groups: list[int]  # pair of each example: cross-validation keeps a pair's examples together
    source: str

    @property
    def differences(self) -> torch.Tensor:
        """(layers, examples, hidden): preferred minus dispreferred, per example."""
        return self.preferred - self.dispreferred

    def mean_difference(self) -> dict[int, torch.Tensor]:
        """The steering vector of each layer: the mean per-example difference."""
        mean = self.differences.mean(dim=1)
        return {layer: mean[i].clone() for i, layer in enumerate(self.layers)}


class PatternReader(Protocol):
    """Anything that reads preferred / dispreferred patterns of preference pairs."""

    name: str

    def read(self, pairs: Sequence[PreferencePair], layers: Sequence[int]) -> Patterns: ...


@dataclass(frozen=True)
class Side:
    """A model state to enter (a context manager yielding the model) and an instruction."""

    state: Callable[[], AbstractContextManager[nn.Module]]
    instruction: str | None


@dataclass
class Windows:
    """Token windows and batching of a read, which replies it uses, and its precision."""

    max_prompt_tokens: int = 128
    max_reply_tokens: int = 64
    batch_size: int = 8
    replies: str = "random"  # per pair: random (seeded), chosen, rejected or both (as patterns.reply)
    seed: int = 0
    bf16: bool = False  # bf16 autocast (fast where bf16 is native; the scan needs no more precision)


@torch.no_grad()
def read_sides(
    preferred: Side,
    dispreferred: Side,
    tokenizer,
    pairs: Sequence[PreferencePair],
    layers: Sequence[int],
    windows: Windows,
    *,
    source: str,
    progress: bool = False,
) -> Patterns:
    """Run both sides over each pair's reply (``windows.replies``); keep reply-token means."""
    from tqdm.auto import tqdm

    if not pairs:
        raise ValueError("no pairs to read patterns from")
    examples = pattern_replies(pairs, windows.replies, seed=windows.seed)
    per_pair = 2 if windows.replies == "both" else 1
    groups = [i // per_pair for i in range(len(examples))]
    pooled: dict[str, torch.Tensor] = {}
    norm_sum = torch.zeros(len(layers), dtype=torch.float64)
    tokens = 0
    for name, side in (("preferred", preferred), ("dispreferred", dispreferred)):
        encoded = [
            encode(tokenizer, pair.prompt, reply, instruction=side.instruction,
                   max_prompt_tokens=windows.max_prompt_tokens, max_reply_tokens=windows.max_reply_tokens,
                   origin=pair.origin)
            for pair, reply in examples
        ]
        # Batches of similar length pad little; rows go back to example order below.
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
        with side.state() as model:
            rows = torch.zeros(len(layers), len(encoded), unwrap(model).config.hidden_size)
            was_training = model.training
            model.eval()
            device = next(model.parameters()).device
            starts = range(0, len(order), windows.batch_size)
            for start in tqdm(starts, desc=f"reading {name}", disable=not progress, leave=False):
                idx = order[start : start + windows.batch_size]
                batch = pad_batch([encoded[i] for i in idx], tokenizer.pad_token_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=windows.bf16):
                    hidden = reply_hidden_states(model, batch, layers).float()  # (L, b, w, H)
                mask = reply_mask(batch["reply_len"], hidden.shape[2]).float()  # (b, w)
                rows[:, idx] = ((hidden * mask[None, :, :, None]).sum(2) / mask.sum(1)[None, :, None]).cpu()
                norm_sum += (hidden.norm(dim=-1) * mask[None]).sum((1, 2)).double().cpu()
                tokens += int(mask.sum())
            model.train(was_training)
        pooled[name] = rows
    return Patterns(
        layers=list(layers),
        preferred=pooled["preferred"],
        dispreferred=pooled["dispreferred"],
        token_norm=(norm_sum / max(tokens, 1)).float(),
        groups=groups,
        source=source,
    )


class InstructionContrast:
    """The model itself under the preferred vs the dispreferred instruction (no training)."""

    name = "instruction-contrast"

    def __init__(self, model: nn.Module, tokenizer, *, preferred_instruction: str | None = None,
                 dispreferred_instruction: str | None = None, windows: Windows | None = None,
                 progress: bool = False) -> None:
        from rahf.instructions import DISPREFERRED_INSTRUCTION, PREFERRED_INSTRUCTION

        self.model, self.tokenizer = model, tokenizer
        self.instructions = (preferred_instruction or PREFERRED_INSTRUCTION,
                             dispreferred_instruction or DISPREFERRED_INSTRUCTION)
        self.windows, self.progress = windows or Windows(), progress

    def read(self, pairs: Sequence[PreferencePair], layers: Sequence[int]) -> Patterns:
        same = lambda: nullcontext(self.model)  # noqa: E731
        return read_sides(Side(same, self.instructions[0]), Side(same, self.instructions[1]), self.tokenizer,
                          pairs, layers, self.windows, source=self.name, progress=self.progress)


class RunReader:
    """The step-1 models of a finished (or step-1-finished) ``rahf align`` run."""

    def __init__(self, run_dir: str | Path, *, batch_size: int = 8, progress: bool = False) -> None:
        from rahf.config import ConfigError, load_config
        from rahf.fitting import load_fit_model
        from rahf.models import load_tokenizer
        from rahf.patterns import FrozenPass, scit_passes
        from rahf.pipeline import RunDir, base_weights
        from rahf.training import use_bf16

        run = RunDir(run_dir)
        self.config = config = load_config(run.root / "config.yaml")
        stages = ["step1"] if config.method == "scit" else ["step1_preferred", "step1_dispreferred"]
        unfinished = [s for s in stages if not (run.stage(s) / "DONE.json").is_file()]
        if unfinished:
            raise ConfigError(f"{run.root}: step 1 is not finished ({', '.join(unfinished)} has no DONE.json);"
                              " run `rahf align` on it first")
        step1 = {} if config.method == "scit" else {s: str(run.stage(f"step1_{s}")) for s in ("preferred", "dispreferred")}
        # Layer 1 keeps the fitting LoRA (zero-initialised, never enabled here) as small as possible.
        _model, self.frozen = load_fit_model(config, base_weights(config, run), step1, [1])
        # SCIT: M_s under I+ / I-. Dual: M+ vs M-, no instruction (whatever patterns.align_target).
        self.passes = scit_passes(config) if config.method == "scit" else {
            "preferred": FrozenPass("preferred", None), "dispreferred": FrozenPass("dispreferred", None)}
        self.tokenizer = load_tokenizer(config.model)
        self.name = f"run:{config.method}"
        self.windows = Windows(config.max_prompt_tokens, config.reply_window, batch_size,
                               replies=config.pattern_reply, seed=config.seed, bf16=use_bf16(config))
        self.progress = progress
        self.validation = run.stage("data") / "validation.jsonl"

    @property
    def model(self) -> nn.Module:
        return self.frozen.model

    def read(self, pairs: Sequence[PreferencePair], layers: Sequence[int]) -> Patterns:
        sides = [Side(lambda s=self.passes[role].state: self.frozen.state(s), self.passes[role].instruction)
                 for role in ("preferred", "dispreferred")]
        return read_sides(*sides, self.tokenizer, pairs, layers, self.windows, source=self.name,
                          progress=self.progress)


def run_reader(run_dir: str | Path, **kwargs) -> RunReader:
    return RunReader(run_dir, **kwargs)
