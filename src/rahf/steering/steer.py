"""Inference-time steering: add a preference direction to the residual stream, no training.

Strength ``s`` on layers ``L`` means: during every forward pass, for every ``l`` in ``L`` and
every position, ``hidden_states[l] += s * v_l``, where ``v_l`` is the vector as read (by
``rahf scan``: the mean over examples of the preferred-minus-dispreferred reply state at layer
``l``). So ``s = 1`` moves each steered layer by one mean pattern difference, the same unit as
RAHF's ``alpha`` in ``target = orig + alpha * (A+ - A-)``; later steered layers also receive the
shifts of earlier ones through the residual stream. The shift is added with a forward hook on
decoder block ``l - 1`` (``rahf.hidden_states.block_of_layer``), at every position, as llama.cpp
applies control vectors.

Reading states under steering: transformers' ``output_hidden_states`` records a block's output
before hooks registered later run, so it shows ``hidden_states[l]`` unshifted (layers above it do
include the shift); ``rahf.hidden_states.capture_blocks`` opened inside the ``steering`` block sees it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import nn

from rahf.hidden_states import block_of_layer, decoder_blocks, num_layers, unwrap


@contextmanager
def steering(
    model: nn.Module,
    vectors: Mapping[int, torch.Tensor],
    *,
    strength: float = 1.0,
    layers: Sequence[int] | None = None,
) -> Iterator[nn.Module]:
    """Within the block, ``model`` adds ``strength * vectors[l]`` to ``hidden_states[l]`` for
    each ``l`` in ``layers`` (default: every layer in ``vectors``)."""
    chosen = sorted(layers if layers is not None else vectors)
    n = num_layers(model)
    bad = [layer for layer in chosen if not 1 <= layer <= n]
    if bad:
        raise ValueError(f"steering layers {bad} out of range: hidden_states indices are 1..{n} for this model")
    missing = [layer for layer in chosen if layer not in vectors]
    if missing:
        raise ValueError(f"no steering vector for layers {missing}")
    blocks = decoder_blocks(model)
    handles = []
    for layer in chosen:
        delta = vectors[layer].detach().reshape(-1) * strength

        def hook(_module, _inputs, output, delta=delta):
            hidden = output[0] if isinstance(output, tuple) else output
            shifted = hidden + delta.to(device=hidden.device, dtype=hidden.dtype)
            return (shifted, *output[1:]) if isinstance(output, tuple) else shifted

        handles.append(blocks[block_of_layer(layer)].register_forward_hook(hook))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def steering_id(model_id: str, vectors: Mapping[int, torch.Tensor], strength: float, layers: Sequence[int]) -> str:
    """A generation-cache identity for ``model_id`` steered this way (hooks leave the weights,
    and so the model's own fingerprint, unchanged)."""
    import hashlib

    digest = hashlib.sha256(model_id.encode())
    for layer in sorted(layers):
        digest.update(f"{layer}:{strength!r}".encode())
        digest.update(vectors[layer].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def steering_from_file(
    model: nn.Module, path: str, *, strength: float | None, layers: str | Sequence[int] | None, model_id: str
) -> tuple[Callable[[], AbstractContextManager], str]:
    """``(steering, generation-cache identity)`` for ``--steer FILE``: each ``steering()`` call opens
    a fresh steering block, so one read of the file serves every pass (``rahf eval`` steers each
    pairs and prompt file in turn)."""
    from rahf.data.schema import DataError
    from rahf.steering.control_vector import load_vectors

    vectors = load_vectors(path)
    if isinstance(layers, str):
        try:
            layers = [int(part) for part in layers.split(",") if part.strip()]
        except ValueError:
            raise DataError(f"--layers expects comma-separated integers, got {layers!r}") from None
    chosen = vectors.band(list(layers) if layers else None)
    strength = strength if strength is not None else vectors.strength
    if strength is None:
        raise DataError(f"{path} has no suggested strength: give --strength S")
    hidden = unwrap(model).config.hidden_size
    if hidden != vectors.hidden_size:
        raise DataError(f"{path}: vectors have {vectors.hidden_size} dimensions but the model's hidden size is"
                        f" {hidden}: they were read from another model")
    return (lambda: steering(model, vectors.vectors, strength=strength, layers=chosen),
            steering_id(model_id, vectors.vectors, strength, chosen))


def sweep_generations(
    model: nn.Module,
    tokenizer,
    conversations: Sequence,
    vectors: Mapping[int, torch.Tensor],
    strengths: Sequence[float],
    layers: Sequence[int],
    **generate_kwargs,
) -> dict[float, list]:
    """``{strength: [GenerationResult per conversation]}`` (``rahf.evaluate.generation.generate``)."""
    from rahf.evaluate.generation import generate

    out = {}
    for strength in strengths:
        with steering(model, vectors, strength=strength, layers=layers):
            out[strength] = generate(model, tokenizer, conversations, **generate_kwargs)
    return out


def format_sweep(prompts: Sequence[str], results: Mapping[float, list], *, width: int = 300) -> str:
    """Each prompt, then its reply at every strength (one line each, cut at ``width`` characters)."""
    lines = []
    for i, prompt in enumerate(prompts):
        lines.append(f"### {prompt}")
        for strength, replies in results.items():
            text = " ".join(replies[i].text.split())
            lines.append(f"  s={strength:g}: {text[:width]}{'...' if len(text) > width else ''}")
        lines.append("")
    return "\n".join(lines)
