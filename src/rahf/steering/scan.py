"""``rahf scan``: which layers carry a consistent preference direction, and how strong to push.

For every ``hidden_states`` layer ``l`` and example ``i`` (a pair's chosen or rejected reply),
``d_i = pos_i - neg_i`` is the preferred-minus-dispreferred difference of the reply-token mean
state (:mod:`rahf.steering.readers`). Per layer:

* ``cv_paired_accuracy``: share of held-out examples with ``d_i . m > 0``, ``m`` the mean
  difference of the other folds (folds split by pair): does the difference point one way?
* ``cv_probe_accuracy``: the mean-difference classifier (direction ``m``, threshold halfway
  between the training folds' preferred and dispreferred means) on held-out single states.
* ``cv_cosine``: mean cosine of held-out ``d_i`` with the training folds' ``m``;
  ``cosine``: the same in-sample (``d_i`` against the mean of all).
* ``relative_size``: ``|m|`` over the mean norm of one reply token's state at that layer.

Recommendation (a heuristic; ``bench/scan.py`` measures it):

* band: the window of ``round(N / 3)`` consecutive layers (N blocks; the span of rahf's default
  band) with the highest mean ``cv_cosine``, among layers 2..N-1 (llama.cpp cannot steer layer
  1; layer N feeds the final norm directly); ``target_layers`` are every other layer of it, as
  rahf's default band is.
* RAHF ``alpha`` (target = A_o + alpha * (A+ - A-), per layer): the range where
  ``alpha * relative_size`` (band mean) is 0.1 .. 0.5 of a token's norm, suggested 0.25.
* steering strength (``rahf steer``: every band layer gets ``s * m_l`` and the residual stream
  carries earlier shifts on): the range where ``s * |sum of m_l over the band|`` is 0.1 .. 0.5 of
  a token's norm at the band's top layer, suggested 0.25.
"""

from __future__ import annotations

import io
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from rahf.steering.readers import Patterns

LOW_SHIFT, SUGGESTED_SHIFT, HIGH_SHIFT = 0.1, 0.25, 0.5


@dataclass
class LayerMetrics:
    layers: list[int]
    cv_paired_accuracy: list[float]
    cv_probe_accuracy: list[float]
    cv_cosine: list[float]
    cosine: list[float]
    relative_size: list[float]
    difference_norm: list[float]
    token_norm: list[float]


def fold_of(groups: list[int], folds: int) -> np.ndarray:
    """Fold of each example: whole pairs go to one fold (deterministic, round robin by pair)."""
    distinct = sorted(set(groups))
    index = {g: i % folds for i, g in enumerate(distinct)}
    return np.array([index[g] for g in groups])


def layer_metrics(patterns: Patterns, *, folds: int = 5) -> LayerMetrics:
    """The per-layer statistics of the module docstring."""
    pos, neg = patterns.preferred.double(), patterns.dispreferred.double()
    diff = pos - neg  # (L, n, H)
    n_groups = len(set(patterns.groups))
    k = max(2, min(folds, n_groups))
    if n_groups < 2:
        raise ValueError("scan needs at least 2 pairs for cross-validation")
    fold = torch.from_numpy(fold_of(patterns.groups, k))
    paired = torch.zeros(diff.shape[:2], dtype=torch.float64)
    probe = torch.zeros(diff.shape[:2], dtype=torch.float64)
    cv_cos = torch.zeros(diff.shape[:2], dtype=torch.float64)
    for f in range(k):
        test, train = fold == f, fold != f
        w = diff[:, train].mean(1)  # (L, H)
        threshold = (w * (pos[:, train].mean(1) + neg[:, train].mean(1)) / 2).sum(-1)  # (L,)
        proj = torch.einsum("lnh,lh->ln", diff[:, test], w)
        paired[:, test] = (proj > 0).double()
        probe[:, test] = ((torch.einsum("lnh,lh->ln", pos[:, test], w) > threshold[:, None]).double()
                          + (torch.einsum("lnh,lh->ln", neg[:, test], w) < threshold[:, None]).double()) / 2
        cv_cos[:, test] = torch.nn.functional.cosine_similarity(diff[:, test], w[:, None, :], dim=-1)
    mean = diff.mean(1)
    cosine = torch.nn.functional.cosine_similarity(diff, mean[:, None, :], dim=-1).mean(1)
    norms = mean.norm(dim=-1)
    token_norm = patterns.token_norm.double()
    return LayerMetrics(
        layers=list(patterns.layers),
        cv_paired_accuracy=paired.mean(1).tolist(),
        cv_probe_accuracy=probe.mean(1).tolist(),
        cv_cosine=cv_cos.mean(1).tolist(),
        cosine=cosine.tolist(),
        relative_size=(norms / token_norm.clamp(min=1e-12)).tolist(),
        difference_norm=norms.tolist(),
        token_norm=token_norm.tolist(),
    )


def recommend(metrics: LayerMetrics, vectors: dict[int, torch.Tensor], num_layers: int,
              span: int | None = None) -> dict:
    """Band, target layers, alpha and strength ranges (module docstring)."""
    span = span or max(1, round(num_layers / 3))
    score = dict(zip(metrics.layers, metrics.cv_cosine, strict=True))
    candidates = [layer for layer in metrics.layers if 2 <= layer <= max(2, num_layers - 1)]
    if not candidates:
        raise ValueError(f"no candidate layers: the model has {num_layers} blocks; scanning needs layers 2..N-1")
    span = min(span, len(candidates))
    best, best_score = None, -math.inf
    for start in candidates:
        window = list(range(start, start + span))
        if all(layer in score and layer in candidates for layer in window):
            value = float(np.mean([score[layer] for layer in window]))
            if value > best_score:
                best, best_score = window, value
    assert best is not None
    targets = best[::2]
    relative = dict(zip(metrics.layers, metrics.relative_size, strict=True))
    token_norm = dict(zip(metrics.layers, metrics.token_norm, strict=True))
    mean_rel = float(np.mean([relative[layer] for layer in targets]))
    summed = float(torch.stack([vectors[layer].double() for layer in targets]).sum(0).norm())
    cumulative = summed / max(token_norm[targets[-1]], 1e-12)

    def scaled(unit: float) -> dict:
        unit = max(unit, 1e-12)
        return {"low": LOW_SHIFT / unit, "suggested": SUGGESTED_SHIFT / unit, "high": HIGH_SHIFT / unit}

    return {
        "band": [best[0], best[-1]],
        "target_layers": targets,
        "band_score": best_score,
        "alpha": scaled(mean_rel),
        "strength": scaled(cumulative),
        "rule": f"band: {span} consecutive layers in 2..{num_layers - 1} with the highest mean cv_cosine;"
                f" alpha / strength: {LOW_SHIFT}..{HIGH_SHIFT} (suggested {SUGGESTED_SHIFT}) of a token's norm",
    }


@dataclass
class ScanConfig:
    model: str = "smollm2"
    data: str | None = None  # default with --run: the run's validation pairs
    run: str | None = None
    out: str = "scan"
    data_format: str = "auto"
    max_pairs: int = 64
    folds: int = 5
    span: int | None = None
    max_prompt_tokens: int = 128
    max_reply_tokens: int = 64
    replies: str = "random"  # which reply of each pair: random, chosen, rejected, both
    precision: str = "auto"  # auto: bf16 autocast where bf16 is native; fp32; bf16
    batch_size: int = 8
    seed: int = 0
    device: str | None = None
    progress: bool = True

    def bf16(self, device: str) -> bool:
        from rahf.trainer import cpu_has_native_bf16

        if self.precision != "auto":
            return self.precision == "bf16"
        if device.startswith("cuda"):
            import torch

            return torch.cuda.is_bf16_supported()
        return cpu_has_native_bf16()


def select_pairs(config: ScanConfig, reader) -> tuple[list, str]:
    """The pairs to scan: ``--data`` (a seeded sample of ``max_pairs``), else a run's validation split."""
    from rahf.data import load_preferences
    from rahf.data.schema import DataError

    if config.data is not None:
        pairs = load_preferences(config.data, format=config.data_format, skip_invalid=True).pairs
        origin = config.data
    elif getattr(reader, "validation", None) is not None and reader.validation.is_file():
        from rahf.runs import read_pairs

        pairs, origin = read_pairs(reader.validation), str(reader.validation)
    else:
        raise DataError("rahf scan needs --data (or --run with a data/validation.jsonl)")
    if len(pairs) > config.max_pairs:
        pairs = random.Random(config.seed).sample(pairs, config.max_pairs)
    if len(pairs) < 2:
        raise DataError(f"{origin}: {len(pairs)} pair(s); a scan needs at least 2")
    return pairs, origin


def make_reader(config: ScanConfig):
    """The pattern reader of ``config``: a run's step-1 models, or the model's instruction contrast."""
    from rahf.steering.readers import InstructionContrast, RunReader, Windows

    if config.run is not None:
        return RunReader(config.run, batch_size=config.batch_size, progress=config.progress)
    from rahf.models import default_device, load_model, load_tokenizer

    device = config.device or default_device()
    model = load_model(config.model, dtype="float32", device=device)
    tokenizer = load_tokenizer(config.model)
    windows = Windows(config.max_prompt_tokens, config.max_reply_tokens, config.batch_size,
                      replies=config.replies, seed=config.seed, bf16=config.bf16(device))
    return InstructionContrast(model, tokenizer, windows=windows, progress=config.progress)


def scan(reader, pairs, *, folds: int = 5, span: int | None = None) -> tuple[dict, dict[int, torch.Tensor]]:
    """Read every layer's patterns with ``reader`` and score them: ``(result, vectors)``."""
    from rahf.hidden_states import num_layers

    n = num_layers(reader.model)
    patterns = reader.read(pairs, list(range(1, n + 1)))
    metrics = layer_metrics(patterns, folds=folds)
    vectors = patterns.mean_difference()
    result = {
        "source": patterns.source,
        "num_layers": n,
        "pairs": len(pairs),
        "examples": patterns.preferred.shape[1],
        "folds": max(2, min(folds, len(set(patterns.groups)))),
        "metrics": asdict(metrics),
        "recommended": recommend(metrics, vectors, n, span),
        "convention": "layers are hidden_states indices: l is the output of 0-based block l-1",
    }
    return result, vectors


def run_scan(config: ScanConfig) -> dict:
    """Scan, then write ``scan.json``, ``scan.png``, ``vectors.safetensors`` (every layer) and
    ``control_vector.gguf`` (the recommended target layers, strength 1) into ``config.out``."""
    from rahf.io import atomic_write_json, check_writable_dir
    from rahf.steering.control_vector import SteeringVectors, save_gguf, save_safetensors

    out = Path(config.out)
    check_writable_dir(out)
    started = time.time()
    reader = make_reader(config)
    pairs, origin = select_pairs(config, reader)
    result, vectors = scan(reader, pairs, folds=config.folds, span=config.span)
    rec = result["recommended"]
    model_name = config.model if config.run is None else reader.config.model
    result.update({"model": model_name, "data": origin, "run": config.run, "seconds": round(time.time() - started, 1)})
    model_type = getattr(getattr(reader.model, "config", None), "model_type", "") or ""
    steer = SteeringVectors(vectors, model=model_name, source=result["source"], layers=rec["target_layers"],
                            strength=rec["strength"]["suggested"])
    files = {
        "json": out / "scan.json",
        "png": out / "scan.png",
        "vectors": save_safetensors(steer, out / "vectors.safetensors"),
        "gguf": save_gguf(steer, out / "control_vector.gguf", model_hint=model_type),
    }
    plot(result, files["png"])
    result["files"] = {k: str(v) for k, v in files.items()}
    atomic_write_json(files["json"], result)
    return result


def plot(result: dict, path: Path) -> Path:
    """Per-layer curves (accuracies, cosines, relative size) with the recommended band shaded."""
    from matplotlib.figure import Figure

    from rahf.io import atomic_write_bytes

    m, rec = result["metrics"], result["recommended"]
    x = m["layers"]
    fig = Figure(figsize=(9, 3.2))
    left, middle, right = fig.subplots(1, 3)
    left.plot(x, m["cv_paired_accuracy"], marker=".", label="paired (d . m > 0)")
    left.plot(x, m["cv_probe_accuracy"], marker=".", label="probe (single states)")
    left.set_ylabel("held-out accuracy")
    middle.plot(x, m["cv_cosine"], marker=".", label="held-out")
    middle.plot(x, m["cosine"], ls="--", label="in-sample")
    middle.set_ylabel("cosine(d_i, mean d)")
    right.plot(x, m["relative_size"], marker=".", color="green")
    right.set_ylabel("|mean d| / token norm")
    for ax in (left, middle, right):
        ax.axvspan(rec["band"][0] - 0.5, rec["band"][1] + 0.5, color="orange", alpha=0.2)
        ax.set_xlabel("hidden_states layer")
    left.legend(fontsize=7)
    middle.legend(fontsize=7)
    fig.suptitle(f"rahf scan: {result.get('model', '')} ({result['source']}, {result['pairs']} pairs);"
                 f" shaded: recommended band {rec['band'][0]}-{rec['band'][1]}", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def summary(result: dict) -> str:
    """One screen: the per-layer table, the recommendation and how to use it."""
    m, rec = result["metrics"], result["recommended"]
    lines = [
        f"rahf scan: {result.get('model', '')}, {result['source']}, {result['pairs']} pairs"
        f" ({result['examples']} examples, {result['folds']}-fold CV by pair), {result.get('seconds', 0):.0f} s",
        "layer  paired-acc  probe-acc  cv-cos  cos    |d|/|h|",
    ]
    band = range(rec["band"][0], rec["band"][1] + 1)
    for i, layer in enumerate(m["layers"]):
        mark = "*" if layer in rec["target_layers"] else ("|" if layer in band else " ")
        lines.append(f"{layer:>4}{mark}  {m['cv_paired_accuracy'][i]:>9.3f}  {m['cv_probe_accuracy'][i]:>9.3f}"
                     f"  {m['cv_cosine'][i]:>6.3f}  {m['cosine'][i]:>5.3f}  {m['relative_size'][i]:>7.3f}")
    a, s = rec["alpha"], rec["strength"]
    lines += [
        f"recommended band {rec['band'][0]}-{rec['band'][1]} (mean cv-cos {rec['band_score']:.3f}),"
        f" target layers (*) {','.join(map(str, rec['target_layers']))}",
        f"RAHF alpha {a['low']:.3g} .. {a['high']:.3g} (suggested {a['suggested']:.3g});"
        f" steering strength {s['low']:.3g} .. {s['high']:.3g} (suggested {s['suggested']:.3g})",
    ]
    files = result.get("files")
    if files:
        lines += [
            f"use: rahf align --set patterns.scan={files['json']} ...",
            f"     rahf steer --steer {files['vectors']} --prompt TEXT --sweep 0,{s['suggested']:.2g}",
            f"     llama-cli --control-vector-scaled {files['gguf']} {s['suggested']:.2g} ...",
        ]
    return "\n".join(lines)
