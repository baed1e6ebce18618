"""CLI: ``rahf scan``, ``rahf steer``, ``rahf compose``.

``rahf scan`` reads its :class:`~rahf.steering.scan.ScanConfig` through :mod:`rahf.config_loader`
(``--config`` / ``--set`` / flags); ``rahf steer`` shares its prompt and vector flags with
``rahf generate``.
"""

from __future__ import annotations

import argparse
import json
import sys

from rahf.config_loader import add_config_options, add_flags, flag, layers_from_args, load
from rahf.data.schema import DataError
from rahf.evaluate.commands import add_prompt_arguments, add_steer_arguments, prompt_items

# `rahf scan`: flag -> ScanConfig key (rahf.config_loader); --config / --set reach every key.
SCAN_FLAGS = [
    flag("--model", help="model (instruction contrast; ignored with --run; default smollm2)"),
    flag("--data", help="preference data (default with --run: the run's validation pairs)"),
    flag("--run", metavar="RUN_DIR", help="read the step-1 models of this rahf align run"),
    flag("--out", metavar="DIR", help="output folder (default ./scan)"),
    flag("--format", "data_format", help="data format (default: detect)"),
    flag("--max-pairs", help="seeded sample of this many pairs (default 64)"),
    flag("--folds", help="cross-validation folds, split by pair (default 5)"),
    flag("--span", help="band width in layers (default: a third of the depth)"),
    flag("--max-prompt-tokens", help="prompt window, instruction included (default 128)"),
    flag("--max-reply-tokens", help="reply window (default 64)"),
    flag("--replies", choices=("random", "chosen", "rejected", "both"),
         help="which reply of each pair is read (default: one at random, seeded; both: twice the cost)"),
    flag("--precision", choices=("auto", "fp32", "bf16"),
         help="auto: bf16 autocast where bf16 is native (CPUs with AVX-512 BF16/AMX, bf16 GPUs)"),
    flag("--batch-size", help="pairs per forward pass (default 8)"),
    flag("--seed", help="seed of the pair sample and the folds (default 0)"),
    flag("--device", help="cpu, cuda, ... (default: cuda if available)"),
]


def scan_config(args: argparse.Namespace):
    """The ScanConfig of ``rahf scan``: defaults <- --config files <- --set <- flags."""
    from rahf.console import is_quiet
    from rahf.steering.scan import ScanConfig

    config = load(ScanConfig, layers_from_args(args, first=[("output level", {"progress": not is_quiet()})]))
    if config.data is None and config.run is None:
        raise DataError("rahf scan needs --data (instruction contrast) or --run RUN_DIR")
    return config


def register(subparsers: argparse._SubParsersAction) -> None:
    sc = subparsers.add_parser(
        "scan",
        help="per-layer preference-direction statistics; recommends a target band and strength",
        description="Read preferred vs dispreferred patterns at every hidden_states layer (the model's"
        " instruction contrast I+ vs I-, or with --run the step-1 models of a rahf run, with that run's"
        " windows), score how"
        " consistently they differ, and write OUT/scan.json, scan.png, vectors.safetensors and"
        " control_vector.gguf (llama.cpp).",
    )
    add_config_options(sc, example="folds=3")
    add_flags(sc, None, SCAN_FLAGS)  # ScanConfig's module loads torch: the flags carry their help
    sc.add_argument("--json", action="store_true", help="print scan.json instead of the summary")
    sc.set_defaults(func=cmd_scan)

    st = subparsers.add_parser(
        "steer",
        help="generate with a preference vector added to the residual stream (no training)",
        description="Add strength * v_l to hidden_states[l] at every position for the chosen layers"
        " (v: a `rahf scan` vector file or a llama.cpp control-vector GGUF); with --sweep, print each"
        " prompt's replies at every strength side by side.",
    )
    st.add_argument("--model", default="smollm2")
    add_steer_arguments(st, required=True)
    st.add_argument("--sweep", help="comma-separated strengths, e.g. 0,2,4,8")
    add_prompt_arguments(st)
    st.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    st.add_argument("--batch-size", type=int, default=8)
    st.add_argument("--device")
    st.add_argument("--export-gguf", metavar="FILE", help="also write the chosen layers at --strength as a llama.cpp control vector")
    st.set_defaults(func=cmd_steer)

    co = subparsers.add_parser(
        "compose",
        help="weighted sum of preference vectors and/or LoRA adapters",
        description="Combine preferences: --vectors FILE:W (sum of w * v per layer) and/or --adapter"
        " DIR:W (a PEFT adapter or a rahf run folder; PEFT add_weighted_adapter, combination 'cat',"
        " whose merged delta-W is exactly the weighted sum). Writes OUT/vectors.safetensors (+ .gguf)"
        " and/or OUT/adapter (and OUT/merged with --merged); `rahf eval --model OUT/adapter` takes it.",
    )
    co.add_argument("--vectors", action="append", default=[], metavar="FILE:WEIGHT")
    co.add_argument("--adapter", action="append", default=[], metavar="DIR:WEIGHT")
    co.add_argument("--out", required=True, metavar="DIR")
    co.add_argument("--merged", action="store_true", help="also write the merged model to OUT/merged")
    co.set_defaults(func=cmd_compose)


def parse_layers(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise DataError(f"--layers expects comma-separated integers, got {text!r}") from None


def parse_weighted(items: list[str], flag: str) -> list[tuple[str, float]]:
    """``PATH:WEIGHT`` items (the weight after the last colon)."""
    out = []
    for item in items:
        path, sep, weight = item.rpartition(":")
        try:
            out.append((path, float(weight)) if sep else (item, 1.0))
        except ValueError:
            raise DataError(f"{flag} expects PATH:WEIGHT, e.g. runs/a:0.5; got {item!r}") from None
    return out


def cmd_scan(args: argparse.Namespace) -> int:
    from rahf.steering.scan import run_scan, summary

    config = scan_config(args)
    result = run_scan(config)
    print(json.dumps(result, indent=2) if args.json else summary(result))
    return 0


def cmd_steer(args: argparse.Namespace) -> int:
    from rahf.evaluate.loading import load_for_eval
    from rahf.steering.control_vector import load_vectors, save_gguf
    from rahf.steering.steer import format_sweep, sweep_generations

    vectors = load_vectors(args.steer)
    layers = vectors.band(parse_layers(args.layers))
    strength = args.strength if args.strength is not None else vectors.strength
    if args.sweep:
        try:
            strengths = [float(s) for s in args.sweep.split(",") if s.strip()]
        except ValueError:
            raise DataError(f"--sweep expects comma-separated numbers, got {args.sweep!r}") from None
    elif strength is not None:
        strengths = [strength]
    else:
        raise DataError(f"{args.steer} has no suggested strength: give --strength S or --sweep")
    if args.export_gguf:
        path = save_gguf(vectors, args.export_gguf, layers=layers, strength=strength or 1.0)
        print(f"wrote {path} (layers {layers} as direction.{layers[0] - 1}..; strength {strength or 1.0:g})",
              file=sys.stderr)
    items = prompt_items(args)
    if not items:
        if args.export_gguf:
            return 0
        raise DataError("nothing to generate: give --prompt TEXT and/or --prompts FILE")
    model, tokenizer, _ = load_for_eval(args.model, device=args.device)
    if model.config.hidden_size != vectors.hidden_size:
        raise DataError(f"{args.steer}: vectors have {vectors.hidden_size} dimensions but {args.model} has"
                        f" hidden size {model.config.hidden_size}: they were read from another model")
    results = sweep_generations(
        model, tokenizer, [item.messages for item in items], vectors.vectors, strengths, layers,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=False,
    )
    print(f"steering {args.model} with {args.steer} at layers {','.join(map(str, layers))}"
          f" (strength = multiples of the vector as read)\n")
    print(format_sweep([item.messages[-1]["content"] for item in items], results))
    return 0


def cmd_compose(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rahf.steering.compose import compose_vectors, write_composed_adapter
    from rahf.steering.control_vector import load_vectors, save_gguf, save_safetensors

    if not args.vectors and not args.adapter:
        raise DataError("rahf compose needs --vectors FILE:W and/or --adapter DIR:W (at least one)")
    out = Path(args.out)
    if args.vectors:
        parts = [(load_vectors(path), weight) for path, weight in parse_weighted(args.vectors, "--vectors")]
        composed = compose_vectors(parts)
        print(f"wrote {save_safetensors(composed, out / 'vectors.safetensors')}")
        exportable = [layer for layer in composed.band() if layer >= 2]
        if exportable:
            print(f"wrote {save_gguf(composed, out / 'control_vector.gguf', layers=exportable)}")
    if args.adapter:
        parts = parse_weighted(args.adapter, "--adapter")
        adapter = write_composed_adapter(parts, out / "adapter", merged=out / "merged" if args.merged else None)
        print(f"wrote {adapter}" + (f" and {out / 'merged'}" if args.merged else ""))
    return 0
