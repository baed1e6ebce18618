"""Pattern readers: where a preferred and a dispreferred activity pattern come from.

Every source sits behind one interface, :class:`PatternReader`: ``read(pairs, layers)`` returns
:class:`Patterns`, the reply-token mean of ``hidden_states[l]`` for each example under the
preferred and the dispreferred side. An example is one (prompt, reply) with the same reply
tokens on both sides (``rahf.data.render`` tokenises replies on their own), so the difference
isolates the side. Which reply of each pair: ``Windows.replies`` (one at random by default;
``both`` doubles the cost).

Both readers read a :class:`rahf.method.patterns.PatternSource`, the interface step 2 of
``rahf align`` reads its patterns through, entered by :class:`rahf.method.patterns.ModelStates`:

* :class:`InstructionContrast`: the model itself under I+ vs I- (no training; RepE's reading
  vectors, and RAHF-SCIT's patterns before step 1): ``instruction_contrast``.
* :func:`run_reader`: the step-1 models of a ``rahf align`` run, as step 2 builds them
  (:meth:`rahf.method.Method.reading_source`, ``rahf.method.fit.load_fit_model``): Dual, the
  preferred vs the dispreferred adapter with no instruction; SCIT, the step-1 model under I+ vs I-.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from rahf.data.render import encode
from rahf.data.schema import PreferencePair
from rahf.hidden_states import pad_batch, reply_hidden_states, reply_mask, unwrap
from rahf.method.patterns import ModelStates, PatternSource, instruction_contrast, pattern_replies


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
def read_source(
    source: PatternSource,
    states: ModelStates,
    tokenizer,
    pairs: Sequence[PreferencePair],
    layers: Sequence[int],
    windows: Windows,
    *,
    progress: bool = False,
) -> Patterns:
    """Run ``source``'s preferred and dispreferred side over each pair's reply
    (``windows.replies``); keep reply-token means."""
    from tqdm.auto import tqdm

    if not pairs:
        raise ValueError("no pairs to read patterns from")
    examples = pattern_replies(pairs, windows.replies, seed=windows.seed)
    per_pair = 2 if windows.replies == "both" else 1
    groups = [i // per_pair for i in range(len(examples))]
    pooled: dict[str, torch.Tensor] = {}
    norm_sum = torch.zeros(len(layers), dtype=torch.float64)
    tokens = 0
    for name in ("preferred", "dispreferred"):
        side = source[name]
        encoded = [
            encode(tokenizer, pair.prompt, reply, instruction=side.instruction,
                   max_prompt_tokens=windows.max_prompt_tokens, max_reply_tokens=windows.max_reply_tokens,
                   origin=pair.origin)
            for pair, reply in examples
        ]
        # Batches of similar length pad little; rows go back to example order below.
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
        with states.state(side.state) as model:
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
        source=source.name,
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
        source = instruction_contrast(*self.instructions, name=self.name)
        return read_source(source, ModelStates(self.model), self.tokenizer, pairs, layers, self.windows,
                           progress=self.progress)


class RunReader:
    """The step-1 models of a finished (or step-1-finished) ``rahf align`` run."""

    def __init__(self, run_dir: str | Path, *, batch_size: int = 8, progress: bool = False) -> None:
        import dataclasses

        from rahf.config import ConfigError, load_saved_config
        from rahf.method import method_for
        from rahf.method.fit import load_fit_model
        from rahf.plan import plan_run
        from rahf.runs import RunDir

        run = RunDir(run_dir)
        self.config = config = load_saved_config(run.root / "config.yaml")
        method = method_for(config)
        unfinished = [s for s in method.step1_stages if not (run.stage(s) / "DONE.json").is_file()]
        if unfinished:
            raise ConfigError(f"{run.root}: step 1 is not finished ({', '.join(unfinished)} has no DONE.json);"
                              " run `rahf align` on it first")
        # Layer 1 keeps the fitting LoRA (zero-initialised, never enabled here) as small as possible.
        plan = plan_run(config, layers=[1])
        _model, self.frozen = load_fit_model(config, method.fit_weights(plan, run), method.step1_folders(run), [1])
        self.name = f"run:{method.name}"
        # SCIT: M_s under I+ / I-. Dual: M+ vs M-, no instruction (whatever patterns.align_target).
        self.source = dataclasses.replace(method.reading_source(config), name=self.name)
        self.tokenizer = plan.tokenizer
        self.windows = Windows(config.max_prompt_tokens, config.reply_window, batch_size,
                               replies=config.pattern_reply, seed=config.seed, bf16=plan.bf16)
        self.progress = progress
        self.validation = run.stage("data") / "validation.jsonl"

    @property
    def model(self) -> nn.Module:
        return self.frozen.model

    def read(self, pairs: Sequence[PreferencePair], layers: Sequence[int]) -> Patterns:
        return read_source(self.source, self.frozen, self.tokenizer, pairs, layers, self.windows, progress=self.progress)


def run_reader(run_dir: str | Path, **kwargs) -> RunReader:
    return RunReader(run_dir, **kwargs)
