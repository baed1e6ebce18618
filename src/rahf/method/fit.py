"""Step 3: fit a LoRA so the model's hidden states match the targets.

For target layers L and the real reply tokens t of each example (padding excluded):

    loss = mean over (l in L, t) of || h_l,t - T_l,t ||_2          (L2 norm over hidden)
           [+ kl_weight * mean over t of KL(p_frozen(. | <t) || p_trained(. | <t))]
           [+ stop_weight * mean over t of KL(s_frozen(<t) || s_trained(<t))]
           [+ anchor_weight * the same next-token KL on the frozen model's own replies]

where s(<t) is the two-way distribution (end the reply, go on) that the next-token distribution
implies: the stop term lets the fit change what the model says but not when it stops. Preference
data often prefers the longer reply (AlpacaEval's chosen reply is the longer one in ~80 % of
pairs), and a fit that copies the preferred model's states copies its later stopping too.
The anchor term (:mod:`rahf.method.anchor`) reads the next-token KL where the model's own
generation goes instead of on the pairs' replies.

where h is the trained model's residual stream on the same input as A_o, and
T = A_o + alpha * (A_+ - A_-) (see ``rahf.method.patterns``). LoRA lives only in blocks that can
move the targets: 0-based blocks 0 .. max(L) - 1, since hidden_states[max(L)] is the output of
block max(L) - 1.

:func:`fit_stage` is step 3 as a run stage: load the model and the frozen states, build the
examples, (optionally) cache the targets, train, save the adapter.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch.utils.data import Sampler
from transformers import TrainerCallback

from rahf import console
from rahf.hidden_states import (
    gather_reply,
    reply_hidden_states,
    reply_mask,
    shared_prompt_saving,
    shared_prompts,
    unwrap,
)
from rahf.io import is_main_process
from rahf.method.patterns import (
    ROLES,
    FitExample,
    ModelStates,
    PatternSource,
    build_targets,
    collate_roles,
    evaluating,
    frozen_patterns,
)
from rahf.method.targets import CacheDType, TargetCache
from rahf.trainer import GuardedTrainer

if TYPE_CHECKING:
    from rahf.plan import RunPlan
    from rahf.runs import RunDir


def fitting_loss(hidden: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean L2 distance over layers and real reply tokens.

    hidden, target: (layers, batch, reply, hidden); mask: (batch, reply) bool.
    """
    distance = (hidden.float() - target.float()).norm(dim=-1)  # (layers, batch, reply)
    weights = mask[None].expand_as(distance).float()
    return (distance * weights).sum() / weights.sum().clamp(min=1)


def next_token_kl(frozen_logits: torch.Tensor, trained_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows (reply tokens) of KL(frozen || trained) of the next-token distributions.

    frozen_logits, trained_logits: (tokens, vocab), the rows :func:`rahf.hidden_states.logits_at` gives.
    """
    log_p = torch.log_softmax(frozen_logits.float(), dim=-1)
    log_q = torch.log_softmax(trained_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def stop_log_probs(logits: torch.Tensor, stop_ids: Sequence[int]) -> torch.Tensor:
    """(tokens, vocab) logits -> (tokens, 2): log-probabilities of ending the reply (any of
    ``stop_ids`` next) and of going on."""
    logits = logits.float()
    is_stop = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    is_stop[list(stop_ids)] = True
    total = torch.logsumexp(logits, dim=-1)
    stop = torch.logsumexp(logits.masked_fill(~is_stop, float("-inf")), dim=-1)
    go = torch.logsumexp(logits.masked_fill(is_stop, float("-inf")), dim=-1)
    return torch.stack([stop, go], dim=-1) - total[:, None]


def stop_kl(frozen_logits: torch.Tensor, trained_logits: torch.Tensor, stop_ids: Sequence[int]) -> torch.Tensor:
    """Mean over rows (reply tokens) of KL(frozen || trained) of the end-or-continue choice."""
    log_p, log_q = stop_log_probs(frozen_logits, stop_ids), stop_log_probs(trained_logits, stop_ids)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


PAD_MULTIPLE = 16  # FitCollator rounds each role's padded width up to a multiple of this
# ``fit.share_prompt: auto``: the trained pass runs a batch's shared prompts once when that skips
# more than this share of the one-call pass's token positions. The second call and the cache it carries
# cost the trained pass more than the frozen ones (it keeps both for the backward): sharing it
# was 1.10x and 1.18x faster in two runs on AlpacaEval windows (median saving 0.28 per batch of 8)
# and 0.89x and 0.97x on the built-in pairs' short prompts (median 0.21). With widths rounded to 16,
# many short-prompt batches save exactly 0.25 and almost none more, while two thirds of AlpacaEval's
# save more; hence "more than". BENCHMARKS.md, "Shared prompt" and "`fit.share_prompt: auto`".
TRAINED_SHARE_ABOVE = 0.25


def trained_pass_shares(batch: dict, mode: bool | Literal["auto"], pad_multiple: int) -> bool:
    """Whether the trained pass runs ``batch``'s repeated prompts once under ``share_trained_prompt``
    ``mode`` (gradient checkpointing aside): never without repeats, always with ``True``, and with
    ``"auto"`` where that skips more than :data:`TRAINED_SHARE_ABOVE` of the positions."""
    shared = shared_prompts(batch) if mode else None
    if shared is None:
        return False
    return mode is True or shared_prompt_saving(batch, shared, pad_multiple) > TRAINED_SHARE_ABOVE


def round_up(width: int, multiple: int) -> int:
    return -(-width // multiple) * multiple


def pad_to_multiple(batch: dict[str, torch.Tensor], multiple: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` / ``attention_mask`` to the next multiple of ``multiple`` tokens.

    Why: on CPU, bf16 autocast keeps oneDNN primitives (and ideep's own cache) per input shape,
    about 13 MB for each new padded width on SmolLM2-135M, and allocations of ever new sizes
    fragment the heap; with one width per batch an epoch's resident memory climbs with the
    number of distinct widths (issue #17). Rounding bounds the widths to ``max / multiple``.
    Padding is masked and right of every real token, so real tokens' states do not change.
    """
    width = batch["input_ids"].shape[1]
    extra = round_up(width, multiple) - width
    if extra == 0:
        return batch
    return {
        **batch,
        "input_ids": torch.nn.functional.pad(batch["input_ids"], (0, extra), value=pad_id),
        "attention_mask": torch.nn.functional.pad(batch["attention_mask"], (0, extra), value=0),
    }


class FitCollator:
    """Batches of every role (each role padded to a multiple of ``pad_multiple`` tokens), plus
    cached targets when a cache is given."""

    def __init__(self, pad_id: int, cache: TargetCache | None = None, *, pad_multiple: int = PAD_MULTIPLE) -> None:
        self.pad_id = pad_id
        self.cache = cache
        self.pad_multiple = pad_multiple

    def __call__(self, examples: Sequence[FitExample]) -> dict:
        batch: dict = {
            role: pad_to_multiple(b, self.pad_multiple, self.pad_id)
            for role, b in collate_roles(examples, self.pad_id).items()
        }
        if self.cache is not None:
            width = int(batch["orig"]["reply_len"].max())
            batch["targets"] = self.cache.batch([e.index for e in examples], width)
            del batch["preferred"], batch["dispreferred"]  # not needed: targets are given
        return batch


def example_length(example: FitExample) -> int:
    """Sorting key of an example: its longest input over the roles (frozen passes pad each role)."""
    return max(role_lengths(example))


def role_lengths(example: FitExample) -> tuple[int, ...]:
    """Input length of each role, in ``ROLES`` order (instructions make them differ in SCIT)."""
    return tuple(len(example.inputs[role].input_ids) for role in ROLES)


def padded_tokens(lengths: Sequence[Sequence[int]], group: Sequence[int], multiple: int = 1) -> int:
    """Tokens the passes of one batch process, padding included: over the roles, the batch size
    times the role's longest input rounded up to ``multiple`` (as :class:`FitCollator` pads).
    What drives a step's memory: activations scale with it."""
    roles = range(len(lengths[group[0]]))
    return sum(len(group) * round_up(max(lengths[i][r] for i in group), multiple) for r in roles)


def length_grouped_order(
    lengths: Sequence[int] | Sequence[Sequence[int]],
    group_size: int,
    generator: torch.Generator,
    *,
    mega_groups: int = 50,
    pad_multiple: int = 1,
) -> list[int]:
    """A random order in which each run of ``group_size`` indices has similar lengths.

    ``lengths``: one length per example, or one per role (:func:`role_lengths`). A random
    permutation is cut into mega-batches of ``mega_groups`` groups, each sorted by (longest)
    length and cut into groups; the full groups are then shuffled, the costliest one
    (:func:`padded_tokens` over all roles) goes first so a run that does not fit in memory fails
    at its first step and later steps reuse the memory the first one took, and a partial group
    (fewer than ``group_size``) goes last. (Trainer's own helper sizes mega-batches for large
    sets and groups nothing on sets of a few batches.)
    """
    per_role = [(n,) if isinstance(n, int) else tuple(n) for n in lengths]
    longest = [max(n) for n in per_role]
    order = torch.randperm(len(per_role), generator=generator).tolist()
    mega = group_size * mega_groups
    groups = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: -longest[i])
        groups += [chunk[i : i + group_size] for i in range(0, len(chunk), group_size)]
    # Only the last mega-batch can leave a partial group: it goes last, since batches are cut from
    # this order every group_size indices and a partial group anywhere else would shift every
    # later batch across two groups (mixed lengths, more padding, new widths).
    partial = [groups.pop()] if groups and len(groups[-1]) < group_size else []
    groups = [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()]
    if groups:
        costliest = max(range(len(groups)), key=lambda g: padded_tokens(per_role, groups[g], pad_multiple))
        groups.insert(0, groups.pop(costliest))
    return [i for group in groups + partial for i in group]


def pair_units(examples: Sequence[FitExample]) -> list[list[int]] | None:
    """Indices of the examples of each pair, when every pair has the same number (>= 2) of them
    (``patterns.reply: both``); otherwise None. Batches keep a unit together so its shared
    prompt goes through each model once (:func:`rahf.hidden_states.reply_hidden_states_shared`)."""
    units: dict[int, list[int]] = {}
    for i, example in enumerate(examples):
        if getattr(example, "pair", -1) < 0:
            return None
        units.setdefault(example.pair, []).append(i)
    sizes = {len(u) for u in units.values()}
    if len(sizes) != 1 or sizes == {1}:
        return None
    return list(units.values())


def unit_order(
    lengths: Sequence[int] | Sequence[Sequence[int]],
    units: Sequence[Sequence[int]],
    group_size: int,
    generator: torch.Generator,
    *,
    grouped: bool = True,
    pad_multiple: int = 1,
) -> list[int]:
    """An order that keeps each unit's examples next to each other and in one batch.

    Units must have one size ``k`` dividing ``group_size``; a unit's length is its longest member's
    (per role). ``grouped``: :func:`length_grouped_order` over units, ``group_size / k`` to a
    group; otherwise a random order of units.
    """
    size = len(units[0])
    if group_size % size:
        raise ValueError(f"batches of {group_size} cannot hold whole units of {size} examples")
    per_role = [(n,) if isinstance(n, int) else tuple(n) for n in lengths]
    unit_lengths = [tuple(max(per_role[i][r] for i in unit) for r in range(len(per_role[unit[0]]))) for unit in units]
    if grouped:
        order = length_grouped_order(unit_lengths, group_size // size, generator, pad_multiple=pad_multiple)
    else:
        order = torch.randperm(len(units), generator=generator).tolist()
    return [i for u in order for i in units[u]]


class LengthGroupedSampler(Sampler[int]):
    """:func:`length_grouped_order` with a new seeded draw each epoch.

    The generator is seeded with ``seed + epoch`` (the Trainer calls ``set_epoch``), so a run
    resumed from a checkpoint sees the same batches as an uninterrupted one.
    """

    def __init__(
        self, lengths: Sequence[int] | Sequence[Sequence[int]], group_size: int, *, seed: int, pad_multiple: int = 1,
        units: Sequence[Sequence[int]] | None = None, grouped: bool = True,
    ) -> None:
        self.lengths, self.group_size, self.seed, self.epoch = list(lengths), group_size, seed, 0
        self.pad_multiple, self.units, self.grouped = pad_multiple, units, grouped

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.units is not None:
            return iter(unit_order(self.lengths, self.units, self.group_size, generator, grouped=self.grouped,
                                   pad_multiple=self.pad_multiple))
        return iter(length_grouped_order(self.lengths, self.group_size, generator, pad_multiple=self.pad_multiple))


def _glibc_malloc_trim():
    """glibc's ``malloc_trim``, or None (another libc, e.g. musl or macOS)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


class ReleaseFreedMemory(TrainerCallback):
    """Hand the heap's freed pages back to the OS at the start of training and after each step.

    Why (issue #17): glibc serves tensors under its mmap threshold, which it raises up to 32 MB
    after the first large free, from the heap. A step's activations are freed at its end, but
    long-lived allocations made between steps (optimizer state, checkpoint saving, logging)
    land in the freed space, so the next large batch cannot reuse it whole and the heap, and the
    resident set, grows again: the peak climbed each time the epoch's largest batch came back.
    ``malloc_trim(0)`` releases every free page of the heap (not only its top), so each step
    starts from the memory it really holds. A no-op where the libc is not glibc.
    """

    def __init__(self) -> None:
        self.trim = _glibc_malloc_trim()

    def release(self) -> None:
        if self.trim is not None:
            self.trim(0)

    def on_train_begin(self, args, state, control, **kwargs):
        self.release()

    def on_step_end(self, args, state, control, **kwargs):
        self.release()


class FitTrainer(GuardedTrainer):
    """Trainer whose loss is :func:`fitting_loss`; the active adapter is the one being fitted."""

    stage = "fit"
    group_by_length = False  # set by setup_fit; read when the train dataloader is built

    def setup_fit(
        self,
        *,
        layers: Sequence[int],
        alpha: float,
        source: PatternSource,
        frozen: ModelStates,
        pad_id: int,
        truncate: bool,
        batch_frozen: bool,
        kl_weight: float,
        stop_weight: float = 0.0,
        stop_ids: Sequence[int] = (),
        anchor_weight: float = 0.0,
        anchor_tokens: int = 64,
        group_by_length: bool = False,
        bf16: bool | None = None,
        share_prompt: bool = True,
        share_trained_prompt: bool | Literal["auto"] = False,
    ) -> None:
        """``bf16``: autocast every forward of the loss (default: as Trainer's ``args.bf16``).
        ``share_prompt``: the frozen passes run a prompt that rows of a batch share once (the
        sampler keeps both replies of a pair in one batch, ``patterns.reply: both``);
        ``share_trained_prompt``: the trained pass too (not under gradient checkpointing, which
        cannot keep a cache; not with ``kl_weight`` or ``stop_weight``, whose terms run the whole
        model and its LM head: a line says so); ``"auto"``: in the batches where that skips enough
        token positions (:data:`TRAINED_SHARE_ABOVE`), since it pays on long prompts and costs on
        short ones. ``stop_ids``: the tokens that end a reply, for ``stop_weight`` and the anchor's
        replies; ``anchor_tokens``: the longest anchor reply (the run's reply window)."""
        from rahf.method.anchor import AnchorReplies

        if stop_weight > 0 and not stop_ids:
            raise ValueError("fit.stop_weight needs the tokens that end a reply (the tokenizer has no EOS token)")
        self.layers, self.alpha, self.source, self.frozen = list(layers), alpha, source, frozen
        self.pad_id, self.truncate, self.batch_frozen, self.kl_weight = pad_id, truncate, batch_frozen, kl_weight
        self.stop_weight, self.stop_ids = stop_weight, list(stop_ids)
        self.anchor_weight = anchor_weight
        self.anchors = AnchorReplies(stop_ids=stop_ids, pad_id=pad_id, max_new_tokens=anchor_tokens) if anchor_weight > 0 else None
        self.group_by_length = group_by_length
        self.share_prompt, self.share_trained_prompt = share_prompt, share_trained_prompt
        checkpointing = getattr(getattr(self, "args", None), "gradient_checkpointing", False)
        if share_prompt and share_trained_prompt and (self.reads_logits() or checkpointing) and is_main_process():
            why = ("fit.kl_weight / fit.stop_weight read the LM head at every reply token" if self.reads_logits()
                   else "gradient checkpointing keeps no cache")
            console.info(f"rahf: fit: the trained pass runs each reply with its own prompt ({why});"
                         " only the frozen passes share it")
        self.bf16 = bool(getattr(getattr(self, "args", None), "bf16", False)) if bf16 is None else bf16
        if hasattr(self, "callback_handler") and not any(
            isinstance(c, ReleaseFreedMemory) for c in self.callback_handler.callbacks
        ):
            self.add_callback(ReleaseFreedMemory())  # host memory: the CPU heap (issue #17)

    def reads_logits(self) -> bool:
        """Whether the loss has next-token terms (which need the whole model and its LM head)."""
        return self.kl_weight > 0 or self.stop_weight > 0

    def _get_train_sampler(self, train_dataset=None) -> Sampler | None:
        """With ``group_by_length``, batches of similar length (our items are FitExamples, which
        Trainer's own length grouping cannot measure); otherwise a random order. Either way a
        pair's examples stay in one batch when the batch size allows (:func:`pair_units`)."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        group = self.args.train_batch_size * self.args.gradient_accumulation_steps
        units = pair_units(dataset) if dataset is not None else None
        if units is not None and self.args.train_batch_size % len(units[0]):
            units = None  # an odd batch size cannot hold whole pairs
        if dataset is None or (not self.group_by_length and units is None):
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        multiple = getattr(self.data_collator, "pad_multiple", 1)
        return LengthGroupedSampler([role_lengths(e) for e in dataset], group, seed=seed, pad_multiple=multiple,
                                    units=units, grouped=self.group_by_length)

    def autocast(self) -> torch.autocast:
        """One precision for every forward of the loss, also those Trainer does not wrap (frozen
        full copies, targets cached before training, calls outside the training loop): a
        precision gap between frozen and trained passes alone puts a floor under the loss."""
        device = next(self.frozen.model.parameters()).device.type
        return torch.autocast(device, dtype=torch.bfloat16, enabled=self.bf16)

    def targets(self, inputs: dict) -> torch.Tensor:
        if "targets" in inputs:
            return inputs["targets"]
        with self.autocast():
            patterns = frozen_patterns(
                self.frozen, self.source, inputs, self.layers,
                pad_id=self.pad_id, truncate=self.truncate, batch_frozen=self.batch_frozen,
                share_prompt=getattr(self, "share_prompt", False), pad_multiple=self.pad_multiple(),
            )
        return build_targets(patterns, self.alpha)

    def pad_multiple(self) -> int:
        """Width multiple of the shared-prompt calls: the collator's (few distinct shapes, issue #17)."""
        return getattr(getattr(self, "data_collator", None), "pad_multiple", PAD_MULTIPLE)

    def shares_trained_prompt(self, model, batch: dict | None = None) -> bool:
        """Whether the trained pass runs ``batch``'s shared prompts once: not under gradient
        checkpointing (a checkpointed block cannot return its cache); with ``"auto"`` only where
        that skips more than :data:`TRAINED_SHARE_ABOVE` of the positions (no batch: may it at all)."""
        mode = getattr(self, "share_trained_prompt", False)
        if not (getattr(self, "share_prompt", False) and mode):
            return False
        if model.training and getattr(unwrap(model), "is_gradient_checkpointing", False):
            return False
        return batch is None or trained_pass_shares(batch, mode, self.pad_multiple())

    def stage_loss(self, model, inputs: dict) -> torch.Tensor:
        orig = inputs["orig"]
        width = int(orig["reply_len"].max())
        if self.reads_logits():
            with self.autocast():
                loss = self._loss_with_logits(model, inputs, width)
        else:
            target = self.targets(inputs)
            with self.autocast():
                hidden = reply_hidden_states(model, orig, self.layers, reply_width=width, truncate=self.truncate,
                                             share_prompt=self.shares_trained_prompt(model, orig),
                                             pad_multiple=self.pad_multiple())
                loss = fitting_loss(hidden, target, reply_mask(orig["reply_len"], width))
        if getattr(self, "anchor_weight", 0.0) > 0:
            with self.autocast():
                loss = loss + self.anchor_weight * self.anchor_kl(model, orig)
        return loss

    def prefetch_anchors(self, examples: Sequence[FitExample]) -> int:
        """Generate, before training, the anchor replies of the prompts the fit will read: every
        prompt when it reads whole epochs, else the first ``max_steps`` batches of the seeded sampler
        (whose order training then repeats); with another sampler, none (the steps generate them).
        Returns how many replies were generated."""
        if getattr(self, "anchors", None) is None:
            return 0
        per_step = self.args.train_batch_size * self.args.gradient_accumulation_steps
        if self.args.max_steps <= 0 or self.args.max_steps * per_step >= len(examples):
            order: Sequence[int] = range(len(examples))
        else:
            sampler = self._get_train_sampler(examples)
            if not isinstance(sampler, LengthGroupedSampler):
                return 0
            order = list(sampler)[: self.args.max_steps * per_step]
        with self.autocast(), evaluating(self.frozen.model), self.frozen.state(self.source.orig.state) as frozen_model:
            return self.anchors.prefetch(frozen_model, [examples[i].inputs["orig"].prompt_ids for i in order])

    def anchor_kl(self, model, batch: dict) -> torch.Tensor:
        """Next-token KL(frozen || trained) on the frozen model's own greedy replies to ``batch``'s
        prompts (:mod:`rahf.method.anchor`), one row per distinct prompt."""
        from rahf.hidden_states import logits_at, predicting_mask
        from rahf.method.anchor import batch_prompts

        with evaluating(self.frozen.model), self.frozen.state(self.source.orig.state) as frozen_model:
            anchored = self.anchors.batch(frozen_model, batch_prompts(batch))
        anchored = {k: v.to(batch["input_ids"].device) for k, v in anchored.items()}
        keep = predicting_mask(anchored["reply_start"], anchored["reply_len"], anchored["input_ids"].shape[1])
        return next_token_kl(self.frozen_logits(anchored, keep), logits_at(model, anchored, keep))

    @torch.no_grad()
    def frozen_logits(self, orig: dict, keep: torch.Tensor) -> torch.Tensor:
        """LM-head logits at ``keep`` of the frozen model the targets start from (A_o's state),
        in eval mode: what the next-token terms, and the held-out check of the stop term, compare
        the trained model with."""
        return self._frozen_pass(orig, keep, ())[0]

    @torch.no_grad()
    def _frozen_pass(self, orig: dict, keep: torch.Tensor, layers: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(logits at keep, A_o at layers over the reply tokens or None)``: one whole pass of A_o's model."""
        from rahf.hidden_states import capture_blocks, logits_at

        with evaluating(self.frozen.model), self.frozen.state(self.source.orig.state) as frozen_model:
            with capture_blocks(frozen_model, layers) as captured:
                logits = logits_at(frozen_model, orig, keep)
        if not layers:
            return logits, None
        width = int(orig["reply_len"].max())
        return logits, torch.stack([gather_reply(captured[layer], orig["reply_start"], width) for layer in layers])

    def _targets_and_frozen_logits(self, inputs: dict, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The targets and the frozen logits, with A_o's model run once: the next-token terms run it
        to the LM head anyway, so A_o is captured at the target layers on the way (it used to run a
        second, truncated pass for the patterns)."""
        orig = inputs["orig"]
        if "targets" in inputs:
            return inputs["targets"], self.frozen_logits(orig, keep)
        frozen_logits, a_o = self._frozen_pass(orig, keep, self.layers)
        others = frozen_patterns(
            self.frozen, self.source, inputs, self.layers, pad_id=self.pad_id, truncate=self.truncate,
            batch_frozen=self.batch_frozen, share_prompt=getattr(self, "share_prompt", False),
            pad_multiple=self.pad_multiple(), roles=("preferred", "dispreferred"),
        )
        return build_targets({"orig": a_o, **others}, self.alpha), frozen_logits

    def _loss_with_logits(self, model, inputs: dict, width: int) -> torch.Tensor:
        """The fitting loss plus the next-token terms: one whole pass of the trained model (its
        target layers captured on the way) and one of the frozen model the targets start from,
        each with the LM head on the reply tokens' predicting positions only."""
        from rahf.hidden_states import capture_blocks, logits_at, predicting_mask

        orig = inputs["orig"]
        keep = predicting_mask(orig["reply_start"], orig["reply_len"], orig["input_ids"].shape[1])
        target, frozen_logits = self._targets_and_frozen_logits(inputs, keep)
        with capture_blocks(model, self.layers) as captured:
            trained_logits = logits_at(model, orig, keep)
        hidden = torch.stack([gather_reply(captured[layer], orig["reply_start"], width) for layer in self.layers])
        loss = fitting_loss(hidden, target, reply_mask(orig["reply_len"], width))
        if self.kl_weight > 0:
            loss = loss + self.kl_weight * next_token_kl(frozen_logits, trained_logits)
        if self.stop_weight > 0:
            loss = loss + self.stop_weight * stop_kl(frozen_logits, trained_logits, self.stop_ids)
        return loss


def load_fit_model(config, base_path: str, step1: dict[str, str], layers: Sequence[int]):
    """The model step 3 trains, with a fresh adapter, and the frozen states its patterns use.

    ``step1`` maps a Dual side to its step-1 folder. Adapters storage: the step-1 adapters are
    loaded next to the new one on the same base (one copy of the weights). Full copies: each side
    is a separate merged model, the reference layout.
    """
    from peft import PeftModel

    from rahf.models import load_model
    from rahf.trainer import add_lora

    model = load_model(base_path, dtype=config.dtype, device=config.device)
    blocks = range(max(layers))
    copies: dict = {}
    if step1 and config.step1.dual_storage == "adapters" and not config.step1.full_finetune:
        model = PeftModel.from_pretrained(model, step1["preferred"] + "/adapter", adapter_name="preferred")
        model.load_adapter(step1["dispreferred"] + "/adapter", adapter_name="dispreferred")
        model = add_lora(model, config.fit.lora, blocks=blocks)
    else:
        for side, folder in step1.items():
            copy = load_model(folder + "/merged", dtype=config.dtype, device=config.device).eval()
            copy.requires_grad_(False)
            copies[side] = copy
        model = add_lora(model, config.fit.lora, blocks=blocks)
    return model, ModelStates(model, copies)


def compute_cache(
    trainer: FitTrainer,
    examples: Sequence[FitExample],
    folder,
    *,
    batch_size: int,
    dtype: CacheDType = "bfloat16",
) -> None:
    """Run the frozen passes once over every example and write the targets to ``folder``
    (stored as ``dtype``: ``fit.cache_dtype``)."""
    from tqdm.auto import tqdm

    from rahf.method.targets import write_cache

    collator = FitCollator(trainer.pad_id)
    device = trainer.args.device

    def chunks():
        for start in tqdm(range(0, len(examples), batch_size), desc="targets", leave=False):
            part = examples[start : start + batch_size]
            batch = collator(part)
            batch = {role: {k: v.to(device) for k, v in b.items()} for role, b in batch.items()}
            yield [e.index for e in part], trainer.targets(batch).cpu(), batch["orig"]["reply_len"].cpu()

    model = trainer.model
    hidden = model.config.hidden_size if hasattr(model, "config") else None
    write_cache(folder, chunks(), layers=len(trainer.layers), hidden=hidden, dtype=dtype)


def fit_stage(plan: RunPlan, run: RunDir, train: Sequence, base: str, out) -> dict:
    """Step 3 as a run stage: fit a fresh adapter on ``base`` (the weights it applies to) so the
    hidden states on ``train``'s pattern examples reach their targets; save ``out/adapter``."""
    from rahf.config import ConfigError
    from rahf.hidden_states import num_layers
    from rahf.io import is_main_process, wait_for_everyone
    from rahf.method.convergence import (
        ConvergenceLog,
        PlateauStop,
        held_out_examples,
        measure_progress,
    )
    from rahf.method.convergence import progress_line as convergence_line
    from rahf.method.patterns import fit_examples
    from rahf.method.targets import CacheError
    from rahf.models import stop_token_ids
    from rahf.runs import read_pairs
    from rahf.trainer import LossLogCallback, train_stage, training_arguments

    config, tokenizer, layers = plan.config, plan.tokenizer, plan.layers
    model, frozen = plan.method.load_fit_models(plan, base, run)
    if max(layers) > num_layers(model):
        raise ConfigError(f"patterns.target_layers go up to {max(layers)} but the model has {num_layers(model)} blocks")
    examples = fit_examples(train, tokenizer, config)
    log = LossLogCallback()
    held, held_source = held_out_examples(config, read_pairs(run.stage("data") / "validation.jsonl"), examples, tokenizer)
    progress, plateau = ConvergenceLog(held), PlateauStop(config.fit.plateau_window, config.fit.plateau_threshold)
    trainer = FitTrainer(
        model=model,
        args=training_arguments(config, config.fit.train, out / "checkpoints", stage="fit"),
        train_dataset=examples,
        data_collator=FitCollator(tokenizer.pad_token_id),
        callbacks=[progress, log, plateau],
    )
    progress.trainer = trainer
    trainer.setup_fit(
        layers=layers, alpha=config.patterns.alpha, source=plan.method.fit_source(config), frozen=frozen,
        pad_id=tokenizer.pad_token_id, truncate=config.fit.truncate_forward,
        batch_frozen=config.fit.batch_frozen, kl_weight=config.fit.kl_weight,
        stop_weight=config.fit.stop_weight, stop_ids=stop_token_ids(model, tokenizer),
        anchor_weight=config.fit.anchor_weight, anchor_tokens=config.reply_window,
        group_by_length=config.fit.group_by_length,
        share_prompt=config.fit.share_prompt != "off",
        share_trained_prompt={"all": True, "auto": "auto"}.get(config.fit.share_prompt, False),
    )
    if config.fit.targets == "cached":
        cache_dir = run.stage("targets")

        def build_cache() -> None:
            if is_main_process():
                compute_cache(trainer, examples, cache_dir, batch_size=config.fit.train.batch_size, dtype=config.fit.cache_dtype)
                run.mark_done("targets")
            wait_for_everyone()

        if not run.is_done("targets"):  # missing, cut off, or a file fails its checksum: recompute
            build_cache()
        try:
            cache = TargetCache(cache_dir)
        except CacheError as err:  # a marker from an older layout that the cache itself rejects
            print(f"rahf: {err}; recomputing the target cache")
            build_cache()
            cache = TargetCache(cache_dir)
        trainer.data_collator = FitCollator(tokenizer.pad_token_id, cache)
    if config.fit.anchor_weight > 0:
        started = time.perf_counter()
        generated = trainer.prefetch_anchors(examples)
        if is_main_process():
            print(f"rahf: fit: {generated} anchor replies (the frozen model's own, fit.anchor_weight) generated"
                  f" ahead in {time.perf_counter() - started:.1f} s")
    result = train_stage(trainer, out, merged=False, model=model)
    result.update(examples=len(examples), layers=layers, plateau_stop=plateau.stopped_at)
    if held:
        result["convergence"] = {"examples": len(held), "source": held_source, **measure_progress(trainer, held)}
        if is_main_process():
            stop, anchor = result["convergence"].get("stop_kl"), result["convergence"].get("anchor_kl")
            print(f"rahf: fit reached, per layer, this share of the target on {len(held)} {held_source} examples"
                  f" (1.0 = reached): {convergence_line(result['convergence'])}"
                  + (f"; the end-or-continue choice moved {stop:.2e} nats per reply token" if stop is not None else "")
                  + (f"; on the frozen model's own replies the next token moved {anchor:.2e} nats" if anchor is not None else ""))
    return result
