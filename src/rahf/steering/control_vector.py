"""Steering-vector files: rahf's safetensors layout and llama.cpp's control-vector GGUF.

Layer convention. rahf indexes a vector by its ``hidden_states`` index ``l`` (see
``rahf.hidden_states``): the vector for ``l`` is added to the output of 0-based decoder block
``l - 1``. A safetensors file holds tensors ``layer.<l>`` in that convention.

llama.cpp's convention is shifted by one. Checked against its sources: ``common/common.cpp``
(``common_control_vector_load_one``: tensor ``direction.k``, k >= 1, k = 0 is rejected, is stored
at row ``k - 1`` of the buffer), ``src/llama-adapter.cpp`` (``llama_adapter_cvec::apply``: row
``il - 1`` goes to ``tensors[il]`` for ``il`` in 1..n_layer-1) and the graph builders
(``cur = build_cvec(cur, il)`` at the end of the block loop ``for il in 0..n_layer-1``, i.e. on
the output of 0-based block ``il``). So ``direction.k`` is added to the output of block ``k``,
which is ``hidden_states[k + 1]``: rahf's layer ``l`` is written as ``direction.{l - 1}``.
``hidden_states[1]`` (block 0's output) cannot be expressed in a llama.cpp control vector and is
refused. llama.cpp adds the vector at every position, prompt and generated tokens alike, times
the scale of ``--control-vector-scaled FILE SCALE``; :func:`rahf.steering.steer.steering` does the
same, so the GGUF written at strength 1 and scaled by S in llama.cpp steers like strength S here.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from rahf.data.schema import DataError

FORMAT = "rahf-steering-vectors"
CONVENTION = "layer.<l>: l is a hidden_states index; added to the output of 0-based block l-1"


@dataclass
class SteeringVectors:
    """One vector per ``hidden_states`` layer, with what the scan recommends for them.

    ``strength`` s means: add s times the vector as read (the mean preferred-minus-dispreferred
    difference at that layer) at every position of every layer steered.
    """

    vectors: dict[int, torch.Tensor]
    model: str = ""
    source: str = ""
    layers: list[int] | None = None  # recommended band
    strength: float | None = None  # recommended strength
    extra: dict = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        return int(next(iter(self.vectors.values())).numel())

    def band(self, layers: list[int] | None = None) -> list[int]:
        """The layers to steer: ``layers``, else the recommended band, else all of them."""
        chosen = layers or self.layers or sorted(self.vectors)
        missing = [layer for layer in chosen if layer not in self.vectors]
        if missing:
            raise DataError(f"no steering vector for layers {missing}; the file has layers {sorted(self.vectors)}")
        return sorted(chosen)

    def scaled(self, weight: float) -> SteeringVectors:
        return replace(self, vectors={k: v * weight for k, v in self.vectors.items()})


def save_safetensors(vectors: SteeringVectors, path: str | Path) -> Path:
    """Write ``layer.<l>`` float32 tensors and the metadata, atomically."""
    from safetensors.torch import save

    from rahf.io import atomic_write_bytes

    metadata = {
        "format": FORMAT,
        "convention": CONVENTION,
        "model": vectors.model,
        "source": vectors.source,
        "layers": json.dumps(vectors.layers),
        "strength": json.dumps(vectors.strength),
        "extra": json.dumps(vectors.extra),
    }
    tensors = {f"layer.{k}": v.detach().float().cpu().contiguous() for k, v in sorted(vectors.vectors.items())}
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return Path(path)


def gguf_name(layer: int) -> str:
    """llama.cpp tensor name for rahf's ``hidden_states`` layer ``layer`` (module docstring)."""
    if layer < 2:
        raise DataError(
            f"layer {layer}: llama.cpp control vectors start at the output of block 1 (hidden_states[2]);"
            " hidden_states[0] and [1] cannot be exported: choose layers >= 2"
        )
    return f"direction.{layer - 1}"


def save_gguf(
    vectors: SteeringVectors,
    path: str | Path,
    *,
    layers: list[int] | None = None,
    strength: float = 1.0,
    model_hint: str = "",
) -> Path:
    """Write a llama.cpp control vector: F32 ``direction.<k>`` tensors (n_embd long) for the
    chosen layers (default: the recommended band), times ``strength``, with
    ``controlvector.model_hint`` and ``controlvector.layer_count``. Atomic."""
    import gguf

    chosen = vectors.band(layers)
    names = [gguf_name(layer) for layer in chosen]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, "controlvector")
        writer.add_string("controlvector.model_hint", model_hint or vectors.model)
        writer.add_int32("controlvector.layer_count", len(chosen))
        for name, layer in zip(names, chosen, strict=True):
            data = (vectors.vectors[layer].detach().float().cpu() * strength).numpy().astype(np.float32)
            writer.add_tensor(name, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_gguf(path: str | Path) -> tuple[dict[int, torch.Tensor], dict[str, object]]:
    """``({hidden_states layer: vector}, metadata)`` of a llama.cpp control-vector GGUF."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    vectors: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        prefix, _, index = tensor.name.partition(".")
        if prefix != "direction" or not index.isdigit() or int(index) < 1:
            raise DataError(f"{path}: tensor '{tensor.name}' is not a control-vector direction.<k> (k >= 1)")
        vectors[int(index) + 1] = torch.from_numpy(np.array(tensor.data, dtype=np.float32).reshape(-1))
    meta = {name: f.contents() for name, f in reader.fields.items() if name.startswith(("controlvector.", "general."))}
    return vectors, meta


def load_vectors(path: str | Path) -> SteeringVectors:
    """A vector file: rahf's ``.safetensors`` or a llama.cpp control-vector ``.gguf``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"steering vector file {path} does not exist (write one with `rahf scan`)")
    if path.suffix == ".gguf":
        vectors, meta = read_gguf(path)
        return SteeringVectors(vectors, model=str(meta.get("controlvector.model_hint", "")), source=str(path),
                               layers=sorted(vectors))
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            vectors = {int(k.split(".", 1)[1]): handle.get_tensor(k) for k in handle.keys() if k.startswith("layer.")}
    except (SafetensorError, ValueError, OSError) as err:
        raise DataError(f"{path}: not a steering vector file ({err}); expected .safetensors or .gguf") from err
    if meta.get("format") != FORMAT or not vectors:
        raise DataError(f"{path}: not a rahf steering vector file (no '{FORMAT}' metadata or no layer.<l> tensors)")
    return SteeringVectors(
        vectors, model=meta.get("model", ""), source=meta.get("source", ""),
        layers=json.loads(meta.get("layers", "null")), strength=json.loads(meta.get("strength", "null")),
        extra=json.loads(meta.get("extra", "{}")),
    )
