"""Batched, seeded, cached generation of replies, including MT-Bench's turn-by-turn answering.

Prompts are tokenised exactly as training sees them (``rahf.data.render.encode_prompt``: chat
template with the generation prompt, optional instruction as the system message, oldest turns
dropped beyond ``max_prompt_tokens``) and left-padded, so every row's new tokens start at the
same column. Greedy by default; with ``do_sample`` the RNG is reseeded with ``seed`` before
every batch (sampled replies depend on the seed and on which prompts share a batch).

Cache: one JSON file per reply under ``cache_dir()/generations`` (or a folder you pass), named
by ``sha256(model identity, prompt token ids, settings)``. The identity is ``model_id`` when
given (the CLI passes a fingerprint of the model folder), else a hash of the weights, so a model
changed in memory never reuses stale replies. Reruns read replies instead of generating them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from rahf.data.render import encode_prompt
from rahf.data.schema import Message
from rahf.evaluate.prompts import PromptItem
from rahf.hidden_states import pad_ids
from rahf.io import atomic_write_json
from rahf.models import cache_dir, stop_token_ids


@dataclass
class GenerationResult:
    text: str  # decoded reply, special tokens removed, surrounding whitespace stripped
    tokens: int  # generated tokens before the end-of-turn token
    hit_limit: bool  # stopped by max_new_tokens, not by an end-of-turn token

    def to_dict(self) -> dict:
        return asdict(self)


class GenerationCache:
    """Replies on disk, one atomically written JSON file per key (safe for parallel runs)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else cache_dir() / "generations"

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> GenerationResult | None:
        path = self._path(key)
        try:
            data = json.loads(path.read_text())
            return GenerationResult(data["text"], int(data["tokens"]), bool(data["hit_limit"]))
        except (OSError, ValueError, KeyError):
            return None

    def put(self, key: str, result: GenerationResult, prompt_text: str) -> None:
        atomic_write_json(self._path(key), {**result.to_dict(), "prompt": prompt_text})


def weights_identity(model: torch.nn.Module) -> str:
    """blake2b of every parameter and buffer (about 1 s for 135M parameters on a CPU)."""
    digest = hashlib.blake2b(digest_size=32)
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def _cache_key(model_id: str, prompt_ids: list[int], settings: dict) -> str:
    blob = json.dumps({"model": model_id, "prompt": prompt_ids, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer,
    conversations: Sequence[Sequence[Message]],
    *,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    instruction: str | None = None,
    max_prompt_tokens: int = 1024,
    cache: GenerationCache | str | Path | None = None,
    model_id: str | None = None,
    progress: bool = True,
) -> list[GenerationResult]:
    """One reply per conversation (each ends with a user message), in input order.

    ``cache``: a :class:`GenerationCache` or a folder for one; None generates without caching.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    settings = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "temperature": temperature if do_sample else None,
        "top_p": top_p if do_sample else None,
        "seed": seed if do_sample else None,
        "instruction": instruction,
        # bf16 and fp32 weights give different greedy replies: the dtype is part of the identity.
        "dtype": str(next(model.parameters()).dtype),
    }
    prompt_ids = [
        encode_prompt(tokenizer, conv, instruction=instruction, max_prompt_tokens=max_prompt_tokens)[0]
        for conv in conversations
    ]
    if cache is not None and not isinstance(cache, GenerationCache):
        cache = GenerationCache(cache)
    keys: list[str | None] = [None] * len(prompt_ids)
    results: list[GenerationResult | None] = [None] * len(prompt_ids)
    if cache is not None:
        identity = model_id or weights_identity(model)
        keys = [_cache_key(identity, ids, settings) for ids in prompt_ids]
        results = [cache.get(key) for key in keys]
    todo = sorted((i for i, r in enumerate(results) if r is None), key=lambda i: len(prompt_ids[i]))

    eos = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0]
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad, eos_token_id=eos or None
    )
    if do_sample:
        config.temperature, config.top_p, config.top_k = temperature, top_p, 0
    was_training = model.training
    model.eval()
    batches = [todo[s : s + batch_size] for s in range(0, len(todo), batch_size)]
    for batch in tqdm(batches, desc="generating", disable=not progress, leave=False):
        if do_sample:
            torch.manual_seed(seed)
        for i, new in zip(batch, continue_batch(model, [prompt_ids[i] for i in batch], config, pad), strict=True):
            kept, stopped = cut_at_stop(new, eos)
            text = tokenizer.decode(kept, skip_special_tokens=True).strip()
            results[i] = GenerationResult(text, len(kept), not stopped)
            if cache is not None:
                cache.put(keys[i], results[i], tokenizer.decode(prompt_ids[i]))
    model.train(was_training)
    return [r for r in results if r is not None]


@torch.no_grad()
def continue_batch(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], config: GenerationConfig, pad_id: int
) -> list[list[int]]:
    """The new token ids after each prompt, from one ``model.generate`` call. Left padding:
    real tokens sit flush right, so every row's new tokens start at the same column."""
    device = next(model.parameters()).device
    input_ids, attention_mask = pad_ids(prompts, pad_id, side="left")
    out = model.generate(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config
    )
    return out[:, input_ids.shape[1] :].tolist()


def cut_at_stop(new: Sequence[int], stop_ids: Sequence[int]) -> tuple[list[int], bool]:
    """``(tokens before the first stop token, whether one came)``: what ``model.generate``
    returned for one row, without the stop token and the padding after it."""
    stop = next((t for t, tok in enumerate(new) if tok in stop_ids), None)
    return (list(new) if stop is None else list(new[:stop])), stop is not None


@dataclass
class TurnResult:
    """One generated turn: the conversation it answered and the reply."""

    item_index: int  # position of the item in the input list
    item_id: str
    turn: int  # 0-based
    conversation: tuple[Message, ...]
    result: GenerationResult


def generate_turns(
    model: torch.nn.Module, tokenizer, items: Sequence[PromptItem], **kwargs
) -> list[TurnResult]:
    """Answer every item, turn by turn: turn k+1's conversation holds the model's turn-k reply.

    Turns are batched across items (all first turns, then all second turns, ...). ``kwargs`` go
    to :func:`generate`. Results are ordered by item, then turn.
    """
    conversations = {i: tuple(item.messages) for i, item in enumerate(items)}
    out: dict[tuple[int, int], TurnResult] = {}
    max_turns = max((item.n_turns for item in items), default=0)
    for turn in range(max_turns):
        active = [i for i, item in enumerate(items) if item.n_turns > turn]
        if turn > 0:  # extend each conversation with its previous reply and the next question
            for i in active:
                previous = out[(i, turn - 1)].result.text
                conversations[i] = (
                    *conversations[i],
                    {"role": "assistant", "content": previous},
                    {"role": "user", "content": items[i].follow_ups[turn - 1]},
                )
        replies = generate(model, tokenizer, [conversations[i] for i in active], **kwargs)
        for i, reply in zip(active, replies, strict=True):
            out[(i, turn)] = TurnResult(i, items[i].id, turn, conversations[i], reply)
    return [out[key] for key in sorted(out)]
