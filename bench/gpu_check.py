"""GPU check, for the days a GPU machine is lent: every stage once on CUDA in bf16, and fit throughput.

Nothing is downloaded: the model is a randomly initialised ``LlamaForCausalLM`` shaped like
SmolLM2-135M (hidden 576, 30 blocks, 9 heads, 3 KV heads, MLP 1536, vocab 49152, tied
embeddings) with rahf's tiny offline tokenizer (its ids are a subset of the vocabulary: fine for
speed, meaningless for quality). It

1. runs ``rahf.pipeline.align`` twice with one optimiser step per training stage: Dual (step 1
   both sides, fit with on-the-fly targets, export) and SCIT (step 1, fit with cached targets,
   export);
2. checks where tensors live: base weights bf16 on CUDA, the fitted LoRA fp32 on CUDA (master
   weights), Trainer in bf16, targets and hidden states on CUDA;
3. times the fit step (Dual, batch 8) with on-the-fly and with cached targets;

and prints one JSON summary. Without CUDA it says so and exits 0 (``--cpu`` runs the same
checks on the CPU with a 4-block model, to test the script itself).

    python bench/gpu_check.py [--steps 20] [--cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

BATCH = 8


def build_model(folder: Path, *, small: bool) -> str:
    """A random SmolLM2-135M-shaped model (or a 4-block one with ``small``) and the tiny tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rahf.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=4 if small else 30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, rms_norm_eps=1e-5,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def align_once(model: str, work: Path, method: str, targets: str, device: str, layers: str) -> tuple[float, Path]:
    from rahf.config import load_config
    from rahf.pipeline import align

    config = load_config(None, [
        f"model={model}", "data=builtin", "max_pairs=16", f"run_dir={work / method}", f"method={method}",
        f"device={device}", "step1.train.max_steps=1", "fit.train.max_steps=1", "logging_steps=1",
        "save_steps=1000", "max_reply_tokens=32", f"fit.targets={targets}",
        f"patterns.target_layers={layers}", "report_to=[none]",
    ])
    started = time.perf_counter()
    align(config)
    return time.perf_counter() - started, work / method


def check_fit_tensors(model: str, work: Path, device: str, layers: list[int], dtype: torch.dtype) -> dict:
    """Where the fit stage's tensors live, and one loss, through the same functions align uses."""
    from rahf.config import load_config
    from rahf.hidden_states import reply_hidden_states
    from rahf.method.fit import FitCollator, FitTrainer, load_fit_model
    from rahf.method.patterns import fit_examples, pattern_source
    from rahf.models import load_tokenizer
    from rahf.runs import read_pairs
    from rahf.trainer import cpu_has_native_bf16, training_arguments

    config = load_config(None, [f"model={model}", "method=dual", f"device={device}", "report_to=[none]",
                                f"patterns.target_layers={layers}", f"fit.train.batch_size={BATCH}"])
    run = work / "dual"
    step1 = {side: str(run / f"step1_{side}") for side in ("preferred", "dispreferred")}
    fitted, frozen = load_fit_model(config, model, step1, layers)
    tokenizer = load_tokenizer(model)
    examples = fit_examples(read_pairs(run / "data" / "train.jsonl"), tokenizer, config)
    args = training_arguments(config, config.fit.train, work / "check", stage="fit")
    trainer = FitTrainer(model=fitted, args=args, train_dataset=examples, data_collator=FitCollator(tokenizer.pad_token_id))
    trainer.setup_fit(layers=layers, alpha=5.0, source=pattern_source(config), frozen=frozen, pad_id=tokenizer.pad_token_id,
                      truncate=True, batch_frozen=True, kl_weight=0.0, group_by_length=True)
    batch = FitCollator(tokenizer.pad_token_id)(examples[:BATCH])
    batch = {role: {k: v.to(device) for k, v in b.items()} for role, b in batch.items()}
    with torch.no_grad():
        targets = trainer.targets(batch)
        with trainer.autocast():
            hidden = reply_hidden_states(fitted, batch["orig"], layers)
    base = [p for n, p in fitted.named_parameters() if "lora_" not in n]
    lora = [p for n, p in fitted.named_parameters() if "lora_" in n and ".default." in n]
    facts = {
        "trainer_bf16": bool(args.bf16),
        "base_dtypes": sorted({str(p.dtype) for p in base}),
        "base_devices": sorted({p.device.type for p in base}),
        "lora_dtypes": sorted({str(p.dtype) for p in lora}),
        "lora_devices": sorted({p.device.type for p in lora}),
        "lora_trainable": all(p.requires_grad for p in lora) and not any(p.requires_grad for p in base),
        "targets": [targets.device.type, str(targets.dtype), list(targets.shape)],
        "hidden": [hidden.device.type, str(hidden.dtype)],
    }
    expect = {
        # bf16 autocast: always on a bf16 GPU; on a CPU where bf16 is native (mixed_precision auto)
        "trainer_bf16": device == "cuda" or cpu_has_native_bf16(),
        "base_dtypes": [str(dtype)],
        "base_devices": [device],
        "lora_dtypes": ["torch.float32"],  # fp32 master weights for the trained adapter
        "lora_devices": [device],
        "lora_trainable": True,
    }
    wrong = {k: (facts[k], v) for k, v in expect.items() if facts[k] != v}
    wrong |= {k: facts[k] for k in ("targets", "hidden") if facts[k][0] != device}
    if wrong:
        raise AssertionError(f"tensors not where expected (got, expected): {wrong}")
    return facts


class StepClock(TrainerCallback):
    """End time of every optimiser step (CUDA synchronised), so the first step can be left out."""

    def __init__(self, device: str) -> None:
        self.device, self.ends = device, []

    def on_step_end(self, args, state, control, **kwargs):
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


def fit_throughput(model: str, work: Path, device: str, layers: list[int], steps: int, targets: str) -> dict:
    """Pairs/s of the Dual fit step (frozen passes + forward/backward + optimizer step), steps
    2..N (the first step pays for kernel selection and allocator warm-up)."""
    from rahf.config import load_config
    from rahf.data import load_preferences
    from rahf.method.fit import FitCollator, FitTrainer, compute_cache, load_fit_model
    from rahf.method.patterns import fit_examples, pattern_source
    from rahf.method.targets import TargetCache
    from rahf.models import load_tokenizer
    from rahf.trainer import training_arguments

    config = load_config(None, [f"model={model}", "method=dual", f"device={device}", "report_to=[none]",
                                f"patterns.target_layers={layers}", f"fit.train.batch_size={BATCH}",
                                f"fit.train.max_steps={steps}", "save_steps=100000", "logging_steps=100000"])
    run = work / "dual"
    step1 = {side: str(run / f"step1_{side}") for side in ("preferred", "dispreferred")}
    fitted, frozen = load_fit_model(config, model, step1, layers)
    tokenizer = load_tokenizer(model)
    pairs = load_preferences("builtin").pairs
    examples = fit_examples(pairs, tokenizer, config)[: BATCH * steps]
    args = training_arguments(config, config.fit.train, work / f"throughput-{targets}", stage="fit")
    clock = StepClock(device)
    trainer = FitTrainer(model=fitted, args=args, train_dataset=examples,
                         data_collator=FitCollator(tokenizer.pad_token_id), callbacks=[clock])
    trainer.setup_fit(layers=layers, alpha=5.0, source=pattern_source(config), frozen=frozen, pad_id=tokenizer.pad_token_id,
                      truncate=True, batch_frozen=True, kl_weight=0.0, group_by_length=True)
    cache_seconds = None
    if targets == "cached":
        started = time.perf_counter()
        compute_cache(trainer, examples, work / "cache", batch_size=BATCH)
        cache_seconds = time.perf_counter() - started
        trainer.data_collator = FitCollator(tokenizer.pad_token_id, TargetCache(work / "cache"))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    seconds = clock.ends[-1] - clock.ends[0]
    return {
        "targets": targets, "timed_steps": len(clock.ends) - 1, "batch": BATCH, "seconds": round(seconds, 2),
        "pairs_per_s": round((len(clock.ends) - 1) * BATCH / 2 / seconds, 2),  # Dual: 2 examples per pair
        "cache_build_s": None if cache_seconds is None else round(cache_seconds, 2),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20) if device == "cuda" else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="fit steps timed per target mode")
    parser.add_argument("--cpu", action="store_true", help="run the checks on the CPU (tests this script)")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: skipped: no CUDA device here (torch.cuda.is_available() is False)."
              " Run it on a GPU machine; --cpu runs the same checks on the CPU.")
        return 0
    device = "cpu" if args.cpu else "cuda"
    dtype = torch.float32 if args.cpu else torch.bfloat16
    if device == "cuda" and not torch.cuda.is_bf16_supported():
        print("gpu_check: this GPU has no bf16 support; the checks expect bf16")
        return 1
    summary: dict = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda,
    }
    with tempfile.TemporaryDirectory(prefix="rahf-gpu-check-") as tmp:
        work = Path(tmp)
        model = build_model(work / "model", small=args.cpu)
        layers = [1, 3] if args.cpu else [9, 11, 13, 15, 17, 19]  # 9..19 of 30, our default band
        spec = ",".join(map(str, layers))
        stages = {}
        stages["dual (step 1 both sides, fit on-the-fly, export)"], _ = align_once(model, work, "dual", "on-the-fly", device, f"[{spec}]")
        stages["scit (step 1, fit cached, export)"], _ = align_once(model, work, "scit", "cached", device, f"[{spec}]")
        summary["align_seconds"] = {k: round(v, 1) for k, v in stages.items()}
        summary["tensors"] = check_fit_tensors(model, work, device, layers, dtype)
        steps = 3 if args.cpu else args.steps
        summary["fit_throughput"] = [fit_throughput(model, work, device, layers, steps, t) for t in ("on-the-fly", "cached")]
    summary["ok"] = True
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
