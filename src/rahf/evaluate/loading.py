"""Load any model a user names for evaluation, and say exactly which weights it was.

A model spec is ``smollm2`` (the embedded default), a local ``save_pretrained`` folder, a hub id,
or a folder holding a PEFT adapter (``adapter_config.json``): then the base named in the adapter
config is loaded, the adapter applied and merged (merged weights generate faster and score the
same). The identity string (spec, resolved path, and the name/size/mtime of every weight file)
keys the generation cache and goes into reports.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from rahf.models import DType, ModelError, load_model, load_tokenizer, resolve_model_path

ADAPTER_CONFIG = "adapter_config.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf", ".json", ".model")


@dataclass(frozen=True)
class ModelInfo:
    """What a spec resolved to: for reports and as the generation-cache identity."""

    spec: str
    path: str  # resolved folder or hub id
    base: str | None  # the base model's path, for an adapter folder
    fingerprint: str  # sha256 over file names, sizes and mtimes (or the hub id)

    def to_dict(self) -> dict:
        return asdict(self)


def is_adapter(spec: str) -> bool:
    return (Path(spec).expanduser() / ADAPTER_CONFIG).is_file()


def folder_fingerprint(path: str) -> str:
    """Cheap identity of a local model folder: sha256 of (name, size, mtime_ns) of its files.

    Reading names and stat() instead of hashing gigabytes of weights; a rewritten file changes
    its mtime. A hub id (not a folder) is its own identity.
    """
    folder = Path(path)
    digest = hashlib.sha256()
    if not folder.is_dir():
        digest.update(f"hub:{path}".encode())
        return digest.hexdigest()
    for file in sorted(folder.rglob("*")):
        if file.is_file() and file.name.endswith(_WEIGHT_SUFFIXES):
            stat = file.stat()
            digest.update(f"{file.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def describe(spec: str) -> ModelInfo:
    """Resolve ``spec`` (converting the embedded default if needed) without loading weights."""
    if is_adapter(spec):
        folder = Path(spec).expanduser()
        try:
            base_spec = json.loads((folder / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
        except (KeyError, json.JSONDecodeError) as err:
            raise ModelError(f"{folder / ADAPTER_CONFIG}: no base_model_name_or_path ({err})") from err
        base = resolve_model_path(base_spec)
        digest = hashlib.sha256(
            (folder_fingerprint(str(folder)) + folder_fingerprint(base)).encode()
        ).hexdigest()
        return ModelInfo(spec, str(folder), base, digest)
    path = resolve_model_path(spec)
    return ModelInfo(spec, path, None, folder_fingerprint(path))


def load_for_eval(spec: str, *, dtype: DType = "auto", device: str | None = None):
    """``(model, tokenizer, info)`` in eval mode; adapter folders come back merged."""
    info = describe(spec)
    if info.base is None:
        model = load_model(spec, dtype=dtype, device=device)
        tokenizer = load_tokenizer(spec)
    else:
        from peft import PeftModel

        model = load_model(info.base, dtype=dtype, device=device)
        model = PeftModel.from_pretrained(model, info.path).merge_and_unload()
        has_tokenizer = any((Path(info.path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        if has_tokenizer:  # an adapter folder has no config.json, so not via load_tokenizer
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(info.path)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            tokenizer.padding_side = "right"
        else:
            tokenizer = load_tokenizer(info.base)
    model.eval()
    return model, tokenizer, info
