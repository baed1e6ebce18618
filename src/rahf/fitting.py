"""Step 3: fit a LoRA so the model's hidden states match the targets.

For target layers L and the real reply tokens t of each example (padding excluded):

    loss = mean over (l in L, t) of || h_l,t - T_l,t ||_2          (L2 norm over hidden)
           [+ kl_weight * mean over t of KL(p_frozen(. | <t) || p_trained(. | <t))]

where h is the trained model's residual stream on the same input as A_o, and
T = A_o + alpha * (A_+ - A_-) (see ``rahf.patterns``). LoRA lives only in blocks that can move
the targets: 0-based blocks 0 .. max(L) - 1, since hidden_states[max(L)] is the output of block
max(L) - 1.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from rahf.patterns import (
    ROLES,
    FitExample,
    FrozenModels,
    FrozenPass,
    build_targets,
    collate_roles,
    frozen_patterns,
)
from rahf.plumbing import gather_reply, reply_hidden_states, reply_mask
from rahf.target_cache import CacheDType, TargetCache
from rahf.training import GuardedTrainer


def fitting_loss(hidden: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean L2 distance over layers and real reply tokens.

    hidden, target: (layers, batch, reply, hidden); mask: (batch, reply) bool.
    """
    distance = (hidden.float() - target.float()).norm(dim=-1)  # (layers, batch, reply)
    weights = mask[None].expand_as(distance).float()
    return (distance * weights).sum() / weights.sum().clamp(min=1)


def reply_kl(frozen_logits: torch.Tensor, trained_logits: torch.Tensor, batch: dict, width: int) -> torch.Tensor:
    """Mean over reply tokens of KL(frozen || trained) of the next-token distributions."""
    start = batch["reply_start"] - 1  # logits at p - 1 predict the token at p
    log_p = torch.log_softmax(gather_reply(frozen_logits, start, width).float(), dim=-1)
    log_q = torch.log_softmax(gather_reply(trained_logits, start, width).float(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    mask = reply_mask(batch["reply_len"], width).float()
    return (kl * mask).sum() / mask.sum().clamp(min=1)


class FitCollator:
    """Batches of every role, plus cached targets when a cache is given."""

    def __init__(self, pad_id: int, cache: TargetCache | None = None) -> None:
        self.pad_id = pad_id
        self.cache = cache

    def __call__(self, examples: Sequence[FitExample]) -> dict:
        batch: dict = collate_roles(examples, self.pad_id)
        if self.cache is not None:
            width = int(batch["orig"]["reply_len"].max())
            batch["targets"] = self.cache.batch([e.index for e in examples], width)
            del batch["preferred"], batch["dispreferred"]  # not needed: targets are given
        return batch


def example_length(example: FitExample) -> int:
    """Padding key of an example: its longest input over the roles (frozen passes pad each role)."""
    return max(len(example.inputs[role].input_ids) for role in ROLES)


def length_grouped_order(
    lengths: Sequence[int], group_size: int, generator: torch.Generator, *, mega_groups: int = 50
) -> list[int]:
    """A random order in which each run of ``group_size`` indices has similar lengths.

    A random permutation is cut into mega-batches of ``mega_groups`` groups, each sorted by
    length and cut into groups; the groups are then shuffled, and the one holding the longest
    example goes first so a run that does not fit in memory fails at its first step. (Trainer's
    own helper sizes mega-batches for large sets and groups nothing on sets of a few batches.)
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    mega = group_size * mega_groups
    groups = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])
        groups += [chunk[i : i + group_size] for i in range(0, len(chunk), group_size)]
    groups = [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()]
    if groups:
        longest = max(range(len(groups)), key=lambda g: max(lengths[i] for i in groups[g]))
        groups.insert(0, groups.pop(longest))
    return [i for group in groups for i in group]


class LengthGroupedSampler(Sampler[int]):
    """:func:`length_grouped_order` with a new seeded draw each epoch.

    The generator is seeded with ``seed + epoch`` (the Trainer calls ``set_epoch``), so a run
    resumed from a checkpoint sees the same batches as an uninterrupted one.
    """

    def __init__(self, lengths: Sequence[int], group_size: int, *, seed: int) -> None:
        self.lengths, self.group_size, self.seed, self.epoch = list(lengths), group_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(length_grouped_order(self.lengths, self.group_size, generator))


class FitTrainer(GuardedTrainer):
    """Trainer whose loss is :func:`fitting_loss`; the active adapter is the one being fitted."""

    stage = "fit"
    group_by_length = False  # set by setup_fit; read when the train dataloader is built

    def setup_fit(
        self,
        *,
        layers: Sequence[int],
        alpha: float,
        passes: dict[str, FrozenPass],
        frozen: FrozenModels,
        pad_id: int,
        truncate: bool,
        batch_frozen: bool,
        kl_weight: float,
        group_by_length: bool = False,
        bf16: bool | None = None,
    ) -> None:
        """``bf16``: autocast every forward of the loss (default: as Trainer's ``args.bf16``)."""
        self.layers, self.alpha, self.passes, self.frozen = list(layers), alpha, passes, frozen
        self.pad_id, self.truncate, self.batch_frozen, self.kl_weight = pad_id, truncate, batch_frozen, kl_weight
        self.group_by_length = group_by_length
        self.bf16 = bool(getattr(getattr(self, "args", None), "bf16", False)) if bf16 is None else bf16

    def _get_train_sampler(self, train_dataset=None) -> Sampler | None:
        """With ``group_by_length``, batches of similar length (our items are FitExamples, which
        Trainer's own length grouping cannot measure); otherwise Trainer's random sampler."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.group_by_length or dataset is None:
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        group = self.args.train_batch_size * self.args.gradient_accumulation_steps
        return LengthGroupedSampler([example_length(e) for e in dataset], group, seed=seed)

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
                self.frozen, self.passes, inputs, self.layers,
                pad_id=self.pad_id, truncate=self.truncate, batch_frozen=self.batch_frozen,
            )
        return build_targets(patterns, self.alpha)

    def stage_loss(self, model, inputs: dict) -> torch.Tensor:
        orig = inputs["orig"]
        width = int(orig["reply_len"].max())
        target = self.targets(inputs)
        with self.autocast():
            if self.kl_weight > 0:
                return self._loss_with_kl(model, orig, target, width)
            hidden = reply_hidden_states(model, orig, self.layers, reply_width=width, truncate=self.truncate)
        return fitting_loss(hidden, target, reply_mask(orig["reply_len"], width))

    def _loss_with_kl(self, model, orig: dict, target: torch.Tensor, width: int) -> torch.Tensor:
        from rahf.plumbing import capture_blocks

        inputs = {"input_ids": orig["input_ids"], "attention_mask": orig["attention_mask"]}
        with capture_blocks(model, self.layers) as captured:
            trained_logits = model(**inputs, use_cache=False).logits
        hidden = torch.stack([gather_reply(captured[layer], orig["reply_start"], width) for layer in self.layers])
        with torch.no_grad(), self.frozen.state(self.passes["orig"].state) as frozen_model:
            frozen_logits = frozen_model(**inputs, use_cache=False).logits
        loss = fitting_loss(hidden, target, reply_mask(orig["reply_len"], width))
        return loss + self.kl_weight * reply_kl(frozen_logits, trained_logits, orig, width)


def load_fit_model(config, base_path: str, step1: dict[str, str], layers: Sequence[int]):
    """The model step 3 trains, with a fresh adapter, and the frozen states its patterns use.

    ``step1`` maps a Dual side to its step-1 folder. Adapters storage: the step-1 adapters are
    loaded next to the new one on the same base (one copy of the weights). Full copies: each side
    is a separate merged model, the reference layout.
    """
    from peft import PeftModel

    from rahf.models import load_model
    from rahf.training import add_lora

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
    return model, FrozenModels(model, copies)


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

    from rahf.target_cache import write_cache

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
