"""Hidden-state access, in one place: decoder blocks, layer indices, reply tokens, padding.

Conventions (mixing them up is the classic bug of this method):

- A *layer index* ``l`` is a ``hidden_states`` index as in Hugging Face: 0 is the embedding
  output and ``l`` in 1..N is the residual stream after decoder block ``l - 1`` (0-based).
  Config fields (``patterns.target_layers``) use layer indices.
- We read hidden states with forward hooks on the blocks, not ``output_hidden_states``, because
  the last ``hidden_states`` entry of many models has the final norm applied and because hooks
  let a forward pass stop early.
- Batches are right-padded (``pad_ids``, the one padding routine; only generation pads left).
  Reply token ``t`` of example ``b`` sits at position ``reply_start[b] + t``; ``reply_len[b]``
  tokens are real. Patterns are aligned by reply token, so inputs with instructions of different
  lengths line up row for row.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Literal

import torch
from torch import nn

from rahf.data.render import Encoded


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under PEFT / DDP wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "get_base_model"):  # PEFT
            model = model.get_base_model()
        else:
            return model


def decoder(model: nn.Module) -> nn.Module:
    """The stack of blocks without the LM head (``LlamaModel`` inside ``LlamaForCausalLM``)."""
    base = unwrap(model)
    inner = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    return inner if isinstance(inner, nn.Module) else base


def _blocks_attr(model: nn.Module) -> tuple[nn.Module, str]:
    dec = decoder(model)
    n = unwrap(model).config.num_hidden_layers
    for name, child in dec.named_children():
        if isinstance(child, nn.ModuleList) and len(child) == n:
            return dec, name
    raise ValueError(f"cannot find the {n} decoder blocks of {type(unwrap(model)).__name__}")


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    owner, name = _blocks_attr(model)
    return getattr(owner, name)


def num_layers(model: nn.Module) -> int:
    return unwrap(model).config.num_hidden_layers


def block_of_layer(layer: int) -> int:
    """0-based block whose output is ``hidden_states[layer]``."""
    return layer - 1


@contextmanager
def truncated(model: nn.Module, n_blocks: int) -> Iterator[None]:
    """Run only the first ``n_blocks`` blocks: later blocks cannot change earlier hidden states."""
    owner, name = _blocks_attr(model)
    full = getattr(owner, name)
    setattr(owner, name, nn.ModuleList(list(full)[:n_blocks]))
    try:
        yield
    finally:
        setattr(owner, name, full)


@contextmanager
def capture_blocks(model: nn.Module, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Record ``hidden_states[l]`` for each layer index in ``layers`` during forward passes."""
    captured: dict[int, torch.Tensor] = {}
    blocks = decoder_blocks(model)
    handles = []
    for layer in layers:

        def hook(_module, _inputs, output, layer=layer):
            captured[layer] = output[0] if isinstance(output, tuple) else output

        handles.append(blocks[block_of_layer(layer)].register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def gather_reply(hidden: torch.Tensor, reply_start: torch.Tensor, reply_width: int) -> torch.Tensor:
    """(batch, seq, hidden) -> (batch, reply_width, hidden): row t is reply token t.

    Rows past an example's reply are filled from clamped positions; mask them with
    :func:`reply_mask`.
    """
    offsets = torch.arange(reply_width, device=hidden.device)
    positions = (reply_start[:, None] + offsets[None, :]).clamp(max=hidden.shape[1] - 1)
    return torch.gather(hidden, 1, positions[:, :, None].expand(-1, -1, hidden.shape[-1]))


def reply_mask(reply_len: torch.Tensor, reply_width: int) -> torch.Tensor:
    """(batch, reply_width) bool: True where reply token t exists."""
    return torch.arange(reply_width, device=reply_len.device)[None, :] < reply_len[:, None]


def reply_hidden_states(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    layers: Sequence[int],
    *,
    reply_width: int | None = None,
    truncate: bool = True,
    share_prompt: bool = False,
    pad_multiple: int = 1,
) -> torch.Tensor:
    """Hidden states at ``layers`` over reply tokens: (layers, batch, reply_width, hidden).

    With ``truncate`` the pass runs the blocks only up to the highest requested layer and the LM
    head on one position. With ``share_prompt``, rows that share a prompt run it once
    (:func:`reply_hidden_states_shared`, widths rounded up to ``pad_multiple``); rows past a
    reply's end then hold other values (masked everywhere they are read).
    """
    width = int(batch["reply_len"].max()) if reply_width is None else reply_width
    shared = shared_prompts(batch) if share_prompt else None
    if shared is not None:
        return reply_hidden_states_shared(model, batch, layers, shared, reply_width=width, truncate=truncate,
                                          pad_multiple=pad_multiple)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with capture_blocks(model, layers) as captured:
        if truncate:
            # Through the top-level model (so DDP/PEFT wrappers see the call), with the head
            # computed for one position only.
            with truncated(model, max(layers)):
                model(**inputs, use_cache=False, logits_to_keep=1)
        else:
            model(**inputs, use_cache=False)
    return torch.stack([gather_reply(captured[layer], batch["reply_start"], width) for layer in layers])


def shared_prompts(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rows of a batch whose prompts are the same tokens: ``(firsts, owner)``, or None if none repeat.

    ``firsts`` holds one row per distinct prompt; ``owner[b]`` is the index into ``firsts`` of row
    ``b``'s prompt. Dual fits both replies of a pair (``patterns.reply: both``), so a batch holds
    each prompt twice: it need not go through a model twice (:func:`reply_hidden_states_shared`).
    """
    starts = batch["reply_start"].tolist()
    keys: dict[tuple, int] = {}
    firsts: list[int] = []
    owner: list[int] = []
    for b, start in enumerate(starts):
        key = (tuple(batch["input_ids"][b, :start].tolist()), tuple(batch["attention_mask"][b, :start].tolist()))
        if key not in keys:
            keys[key] = len(firsts)
            firsts.append(b)
        owner.append(keys[key])
    if len(firsts) == len(starts):
        return None
    return torch.tensor(firsts), torch.tensor(owner)


def shared_prompt_saving(batch: dict[str, torch.Tensor], shared: tuple[torch.Tensor, torch.Tensor],
                         pad_multiple: int = 1) -> float:
    """The share of a one-call pass's token positions that :func:`reply_hidden_states_shared`
    does not compute (0.0: none; widths rounded as that function rounds them)."""
    firsts, _ = shared
    rows, seq = batch["input_ids"].shape
    prompt = _round_up(max(int(batch["reply_start"].max()), 1), pad_multiple)
    reply = _round_up(max(int(batch["reply_len"].max()), 1), pad_multiple)
    return 1.0 - (len(firsts) * prompt + rows * reply) / (rows * seq)


def _cache_argument(model: nn.Module) -> str:
    """The forward keyword that takes a KV cache (``cache`` since transformers 5.24, before it
    ``past_key_values``)."""
    return "cache" if "cache" in inspect.signature(unwrap(model).forward).parameters else "past_key_values"


def _round_up(width: int, multiple: int) -> int:
    return -(-width // multiple) * multiple


def reply_hidden_states_shared(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    layers: Sequence[int],
    shared: tuple[torch.Tensor, torch.Tensor],
    *,
    reply_width: int | None = None,
    truncate: bool = True,
    pad_multiple: int = 1,
) -> torch.Tensor:
    """:func:`reply_hidden_states` with each distinct prompt run once (``shared``: :func:`shared_prompts`).

    Two calls: the distinct prompts (their rows cut at the longest prompt) with ``use_cache``, then
    every row's reply tokens on its prompt's keys and values (the cache rows picked per row by
    ``owner``). Position ids carry on from each row's own prompt length and the attention mask is
    the prompt's mask followed by the reply's, so each reply token sees what it sees in the one-call
    pass: the same states up to float rounding. Gradients flow into the shared prompt through the
    cache, so the trained pass can use it too. Widths are rounded up to ``pad_multiple``
    (``rahf.method.fit.PAD_MULTIPLE``: few distinct shapes).
    """
    firsts, owner = (t.to(batch["input_ids"].device) for t in shared)
    starts, lengths = batch["reply_start"], batch["reply_len"]
    width = int(lengths.max()) if reply_width is None else reply_width
    seq = batch["input_ids"].shape[1]
    prompt_width = _round_up(max(int(starts.max()), 1), pad_multiple)
    columns = torch.arange(prompt_width, device=starts.device)
    prompt_cols = columns.clamp(max=seq - 1)
    prompt_ids = batch["input_ids"][firsts][:, prompt_cols]
    prompt_mask = batch["attention_mask"][firsts][:, prompt_cols] * (columns[None, :] < starts[firsts][:, None])
    reply_cols = _round_up(max(width, 1), pad_multiple)
    offsets = torch.arange(reply_cols, device=starts.device)
    positions = starts[:, None] + offsets[None, :]
    reply_ids = torch.gather(batch["input_ids"], 1, positions.clamp(max=seq - 1))
    mask = torch.cat([prompt_mask[owner], reply_mask(lengths, reply_cols).long()], dim=1)
    keep = {"logits_to_keep": 1} if truncate else {}
    cache_arg = _cache_argument(model)
    with capture_blocks(model, layers) as captured, (truncated(model, max(layers)) if truncate else nullcontext()):
        out = model(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True, logits_to_keep=1)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        cache.batch_select_indices(owner)
        model(input_ids=reply_ids, attention_mask=mask, position_ids=positions, use_cache=True,
              **{cache_arg: cache}, **keep)
    return torch.stack([captured[layer][:, :width] for layer in layers])


def pad_ids(
    rows: Sequence[Sequence[int]], pad_id: int, *, side: Literal["right", "left"] = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both (batch, longest row): every batch of token lists is
    padded here.

    ``right`` (training, scoring, reward models): row ``b`` holds its tokens at 0..len-1, so reply
    token ``t`` sits at ``reply_start + t`` and a classifier reads the last real token. ``left``
    (generation): real tokens sit flush right, so every row's new tokens start at the same column.
    """
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        real = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        input_ids[b, real] = torch.tensor(row, dtype=torch.long)
        attention_mask[b, real] = 1
    return input_ids, attention_mask


def pad_batch(examples: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into tensors, with reply positions and lengths."""
    input_ids, attention_mask = pad_ids([e.input_ids for e in examples], pad_id)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "reply_start": torch.tensor([len(e.prompt_ids) for e in examples]),
        "reply_len": torch.tensor([len(e.reply_ids) for e in examples]),
    }


def predicting_mask(reply_start: torch.Tensor, reply_len: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(batch, seq_len) bool: True at the positions whose logits predict a reply token.

    Reply token ``t`` sits at ``reply_start + t`` and is predicted from position
    ``reply_start + t - 1``; flattened row by row, the True positions are the reply tokens in the
    order of :func:`reply_mask`. Needs ``reply_start >= 1`` (a first token has no prediction).
    """
    if bool((reply_start < 1).any()):
        raise ValueError("a reply starts at position 0: its first token has no prediction (empty prompt)")
    positions = torch.arange(seq_len, device=reply_start.device)[None, :]
    first = (reply_start - 1)[:, None]
    return (positions >= first) & (positions < first + reply_len[:, None])


def logits_at(model: nn.Module, batch: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """LM-head logits at the True positions of ``keep`` (batch, seq): (n_true, vocab), row by row.

    The head is the largest matmul of a small model's pass (vocab x hidden per position); training
    losses read it only on reply tokens, so it runs only there (``logits_to_keep`` as a mask). The
    call goes through the top-level model, so DDP / FSDP / PEFT wrappers see it.
    """
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, logits_to_keep=keep
    ).logits
    expected = int(keep.sum())
    if logits.dim() != 2 or logits.shape[0] != expected:
        name = type(unwrap(model)).__name__
        raise ValueError(
            f"{name} ignores a boolean logits_to_keep mask (got logits {tuple(logits.shape)}, expected "
            f"({expected}, vocab)): this model is not supported for reply-only losses"
        )
    return logits


def reply_token_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Log-probability of each reply token given everything before it: (batch, reply_width).

    Entries past an example's reply are 0. The LM head runs on the reply's predicting positions
    only (:func:`logits_at`).
    """
    input_ids = batch["input_ids"]
    width = int(batch["reply_len"].max())
    keep = predicting_mask(batch["reply_start"], batch["reply_len"], input_ids.shape[1])
    logits = logits_at(model, batch, keep).float()
    # The token at position p is predicted by the logits at p - 1.
    tokens = input_ids.roll(-1, dims=1)[keep]
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    out = torch.zeros((input_ids.shape[0], width), dtype=logprobs.dtype, device=logprobs.device)
    return out.masked_scatter(reply_mask(batch["reply_len"], width), logprobs)
