"""Step 2: activity patterns, and the targets step 3 fits.

Three frozen forward passes per example, each a (model state, instruction) on the same reply:

    A_o   — the model being aligned, on the input step 3 trains on
    A_+   — the preferred side,  A_- — the dispreferred side

Every pattern source is a :class:`PatternSource`: a :class:`Side` per role, naming a model state
(entered by :class:`ModelStates`) and the instruction placed as system prompt. SCIT and Dual
differ only in their source (:func:`instruction_contrast`, :func:`dual_source`): SCIT uses the
step-1 model M_s under the preferred / dispreferred instruction; Dual uses the preferred /
dispreferred adapters with no instruction. The steering readers (``rahf.steering.readers``) read
the same sources. Hidden states are kept at the target layers over reply tokens, aligned by reply
token (row t is reply token t in all three, whatever the instruction lengths). The target per
layer l and reply token is

    T_l = A_o,l + alpha * (A_+,l - A_-,l)
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import nn

from rahf.config import AlignConfig
from rahf.data.render import Encoded, encode
from rahf.data.schema import PreferencePair
from rahf.hidden_states import pad_batch, reply_hidden_states, unwrap

ROLES = ("orig", "preferred", "dispreferred")
FROZEN = "frozen"  # the weights under the adapter being fitted (that adapter disabled)


@dataclass(frozen=True)
class Side:
    """One frozen pass: a model state and the instruction placed as system prompt."""

    state: str  # FROZEN, a step-1 adapter name, or the name of a separate full copy
    instruction: str | None


@dataclass(frozen=True)
class PatternSource:
    """Where A_o, A_+ and A_- come from: the one thing SCIT, Dual and the readers vary."""

    name: str
    orig: Side
    preferred: Side
    dispreferred: Side

    def __getitem__(self, role: str) -> Side:
        return getattr(self, role)

    def roles(self) -> dict[str, Side]:
        """``{role: side}`` in ``ROLES`` order."""
        return {role: self[role] for role in ROLES}


def instruction_contrast(preferred: str, dispreferred: str, *, name: str = "instruction-contrast") -> PatternSource:
    """One frozen model; only the instruction differs (SCIT's M_s; RepE's reading vectors)."""
    return PatternSource(name, Side(FROZEN, None), Side(FROZEN, preferred), Side(FROZEN, dispreferred))


def dual_source(align_target: str, preferred_instruction: str) -> PatternSource:
    """Dual: the base model, and the preferred / dispreferred models, all without instruction.

    ``align_target="preferred"`` (reference code): the aligned model is M+ itself, so A_o is M+
    under I+ and A_+ is M+ without instruction (both: the frozen weights under the fitted
    adapter); M- is a separate copy (``rahf.method.step1_dual.load_preferred_target``).
    """
    if align_target == "preferred":
        return PatternSource("dual", Side(FROZEN, preferred_instruction), Side(FROZEN, None), Side("dispreferred", None))
    return PatternSource("dual", Side(FROZEN, None), Side("preferred", None), Side("dispreferred", None))


@dataclass(frozen=True)
class FitExample:
    """One reply rendered for each role; ``inputs['orig']`` is also what step 3 trains on."""

    inputs: dict[str, Encoded]
    index: int  # position in the example list (row of the cached targets)
    pair: int = -1  # the pair it comes from: with patterns.reply both, two examples share it (and the prompt)


def pattern_replies(pairs: Sequence[PreferencePair], choice: str, seed: int) -> list[tuple[PreferencePair, str]]:
    """Which reply each pattern uses: random (50/50, seeded), chosen, rejected, or both."""
    rng = random.Random(seed)
    out = []
    for pair in pairs:
        if choice == "both":
            out += [(pair, pair.chosen), (pair, pair.rejected)]
        elif choice == "chosen":
            out.append((pair, pair.chosen))
        elif choice == "rejected":
            out.append((pair, pair.rejected))
        else:
            out.append((pair, pair.chosen if rng.random() < 0.5 else pair.rejected))
    return out


def pattern_source(config: AlignConfig) -> PatternSource:
    """The fit's pattern source for ``config`` (:meth:`rahf.method.Method.fit_source`)."""
    from rahf.method import method_for

    return method_for(config).fit_source(config)


def fit_examples(pairs: Sequence[PreferencePair], tokenizer, config: AlignConfig) -> list[FitExample]:
    source = pattern_source(config)
    windows = {"max_prompt_tokens": config.max_prompt_tokens, "max_reply_tokens": config.reply_window}
    position = {id(pair): i for i, pair in enumerate(pairs)}
    examples = []
    for index, (pair, reply) in enumerate(pattern_replies(pairs, config.pattern_reply, config.seed)):
        inputs = {
            role: encode(tokenizer, pair.prompt, reply, instruction=source[role].instruction, **windows)
            for role in ROLES
        }
        examples.append(FitExample(inputs, index, position[id(pair)]))
    return examples


def collate_roles(examples: Sequence[FitExample], pad_id: int) -> dict[str, dict[str, torch.Tensor]]:
    """{role: padded batch}. All roles share reply tokens, so reply_len is the same."""
    return {role: pad_batch([e.inputs[role] for e in examples], pad_id) for role in ROLES}


def concat_batches(batches: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack right-padded batches of different widths into one."""
    width = max(b["input_ids"].shape[1] for b in batches)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    return {
        "input_ids": torch.cat([pad(b["input_ids"], pad_id) for b in batches]),
        "attention_mask": torch.cat([pad(b["attention_mask"], 0) for b in batches]),
        "reply_start": torch.cat([b["reply_start"] for b in batches]),
        "reply_len": torch.cat([b["reply_len"] for b in batches]),
    }


class ModelStates:
    """Puts the model in each frozen state: fitted adapter disabled, a step-1 adapter, or a copy.

    A model without adapters is its own ``FROZEN`` state (the readers' plain model).
    """

    def __init__(self, model: nn.Module, copies: dict[str, nn.Module] | None = None) -> None:
        self.model = model
        self.copies = copies or {}

    @contextmanager
    def state(self, name: str) -> Iterator[nn.Module]:
        if name in self.copies:
            copy = self.copies[name]
            device = next(unwrap(self.model).parameters()).device
            if next(copy.parameters()).device != device:
                copy.to(device)
            yield copy
            return
        if name == FROZEN and not _has_peft(self.model):
            yield self.model
            return
        peft = _peft(self.model)
        if name == FROZEN:
            with peft.disable_adapter():
                yield self.model
            return
        active = peft.active_adapter
        peft.set_adapter(name, inference_mode=True)
        try:
            yield self.model
        finally:
            peft.set_adapter(active)


def _has_peft(model: nn.Module) -> bool:
    while not isinstance(model, PeftModel):
        if not hasattr(model, "module"):
            return False
        model = model.module
    return True


def _peft(model: nn.Module) -> PeftModel:
    while not isinstance(model, PeftModel):
        if not hasattr(model, "module"):
            raise TypeError("frozen passes need a PEFT model (or full copies)")
        model = model.module
    return model


@torch.no_grad()
def frozen_patterns(
    frozen: ModelStates,
    source: PatternSource,
    batches: dict[str, dict[str, torch.Tensor]],
    layers: Sequence[int],
    *,
    pad_id: int,
    truncate: bool = True,
    batch_frozen: bool = True,
    share_prompt: bool = True,
    pad_multiple: int = 1,
    roles: Sequence[str] = ROLES,
) -> dict[str, torch.Tensor]:
    """Hidden states of each of ``roles``: {role: (layers, batch, reply_width, hidden)}.

    Roles that share a model state go through it in one batched call when ``batch_frozen``
    (SCIT: all three; Dual: none). With ``share_prompt``, a prompt that several rows of a call
    share (Dual's two replies of a pair) goes through the model once
    (:func:`rahf.hidden_states.reply_hidden_states_shared`); widths round up to ``pad_multiple``.
    """
    width = int(batches["orig"]["reply_len"].max())
    groups: dict[str, list[str]] = {}
    for role in roles:
        groups.setdefault(source[role].state, []).append(role)
    if not batch_frozen:
        groups = {f"{source[r].state}\0{r}": [r] for r in roles}
    out: dict[str, torch.Tensor] = {}
    with evaluating(frozen.model):
        for key, roles in groups.items():
            batch = concat_batches([batches[r] for r in roles], pad_id) if len(roles) > 1 else batches[roles[0]]
            with frozen.state(key.split("\0")[0]) as m:
                hidden = reply_hidden_states(m, batch, layers, reply_width=width, truncate=truncate,
                                             share_prompt=share_prompt, pad_multiple=pad_multiple)
            for role, part in zip(roles, hidden.chunk(len(roles), dim=1), strict=True):
                out[role] = part
    return out


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode for a frozen pass through the model being trained: a step-1 adapter's LoRA
    dropout would otherwise add noise to the targets (the mode is restored after)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def build_targets(patterns: dict[str, torch.Tensor], alpha: float) -> torch.Tensor:
    """T = A_o + alpha * (A_+ - A_-), per layer and reply token: (layers, batch, reply, hidden)."""
    return patterns["orig"] + alpha * (patterns["preferred"] - patterns["dispreferred"])
