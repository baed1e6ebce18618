"""Composing preferences: weighted sums of steering vectors and of LoRA adapters.

* Vectors: ``v_l = sum_i w_i * v_i,l`` per layer (a layer missing from a file counts as 0).
* Adapters: PEFT's ``add_weighted_adapter`` with ``combination_type="cat"``: it stacks the
  adapters' ranks, ``A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]``, ``B = [B_1, B_2, ...]`` with scaling 1
  (``lora_alpha = r = sum of ranks``), so the merged weight change is exactly
  ``delta W = B A = sum_i w_i * s_i * B_i A_i = sum_i w_i * delta W_i``. (``"linear"`` mixes the
  A and B matrices separately, which adds cross terms ``B_i A_j``: it is not the weighted sum.)
  The adapters must apply to the same base weights (a RAHF-SCIT adapter applies to its step-1
  model, a Dual one to the original model).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from rahf.data.schema import DataError
from rahf.steering.control_vector import SteeringVectors

COMBINATION = "cat"


def compose_vectors(parts: Sequence[tuple[SteeringVectors, float]]) -> SteeringVectors:
    """The weighted sum of vector sets; recommended layers: the union of the parts'."""
    if not parts:
        raise DataError("nothing to compose: give at least one vector file")
    sizes = {v.hidden_size for v, _ in parts}
    if len(sizes) > 1:
        raise DataError(f"vector files differ in hidden size ({sorted(sizes)}): they are from different models")
    layers = sorted({layer for v, _ in parts for layer in v.vectors})
    summed = {}
    for layer in layers:
        total = torch.zeros(parts[0][0].hidden_size)
        for vectors, weight in parts:
            if layer in vectors.vectors:
                total = total + weight * vectors.vectors[layer].float()
        summed[layer] = total
    recommended = sorted({layer for v, _ in parts for layer in (v.layers or [])}) or None
    return SteeringVectors(summed, model=parts[0][0].model, source="compose: " + " + ".join(
        f"{w:g} * {v.source or '?'}" for v, w in parts), layers=recommended)


def adapter_folder(path: str) -> Path:
    """An adapter folder, or a run folder's ``final/adapter``."""
    folder = Path(path).expanduser()
    for candidate in (folder, folder / "final" / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise DataError(f"{path}: no adapter_config.json (give a PEFT adapter folder or a rahf run folder)")


def _base_of(folder: Path) -> str:
    return json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]


def compose_adapters(parts: Sequence[tuple[str, float]], *, device: str = "cpu"):
    """A PEFT model whose active adapter ``default`` is the weighted ``cat`` combination."""
    from peft import PeftModel

    from rahf.models import load_model, resolve_model_path

    if not parts:
        raise DataError("nothing to compose: give at least one adapter")
    folders = [adapter_folder(p) for p, _ in parts]
    bases = {str(Path(resolve_model_path(_base_of(f))).resolve()) if Path(_base_of(f)).exists() else _base_of(f)
             for f in folders}
    if len(bases) > 1:
        raise DataError(f"the adapters apply to different base weights ({', '.join(sorted(bases))});"
                        " only adapters on the same base compose")
    model = load_model(_base_of(folders[0]), dtype="float32", device=device)
    names = [f"part{i}" for i in range(len(folders))]
    model = PeftModel.from_pretrained(model, str(folders[0]), adapter_name=names[0])
    for name, folder in zip(names[1:], folders[1:], strict=True):
        model.load_adapter(str(folder), adapter_name=name)
    model.add_weighted_adapter(names, [w for _, w in parts], "default", combination_type=COMBINATION)
    model.set_adapter("default")
    for name in names:
        model.delete_adapter(name)
    return model


def write_composed_adapter(parts: Sequence[tuple[str, float]], out: str | Path, *, merged: str | Path | None = None) -> Path:
    """Write the composite adapter to ``out`` (``rahf eval --model OUT`` takes it), and optionally
    the merged model to ``merged``."""
    from rahf.export import write_merged
    from rahf.io import atomic_dir
    from rahf.models import load_tokenizer

    model = compose_adapters(parts)
    out = Path(out)
    base = _base_of(adapter_folder(parts[0][0]))

    def build(tmp: Path) -> None:
        model.save_pretrained(tmp)
        config_path = tmp / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = base
        config_path.write_text(json.dumps(config, indent=2))

    atomic_dir(out, build)
    if merged is not None:
        write_merged(out, Path(merged), load_tokenizer(base))
    return out
