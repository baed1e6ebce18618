"""Benchmark v2 (#13): base, SFT, DPO, RAHF-SCIT, RAHF-Dual, prompting and steering, at matched compute.

Every trained method gets the same training CPU-seconds (all its stages together): each
(method, setting) is calibrated once on a few steps (seed 0), its per-stage CPU-seconds per step
give each stage's ``max_steps`` (RAHF's split of the budget across its stages is one of its
settings), and seeds 1 and 2 reuse those steps. Tuning: the 4 settings per method in ``SETTINGS``,
picked on seed 0 on the validation split by ``benchlib.pick_setting``; then 3 seeds at the pick, and ablation rows
for the best RAHF variant (one knob changed at a time). rahf is reached only through its CLI
(``rahf align / baseline / eval / scan / train-rm``), run from ``git archive`` of one commit
(``--commit``, pinned in OUT/commit.json) so other people's edits cannot change a running queue.
Every job is its own subprocess with 1 thread; CPU-seconds and peak RSS come from ``os.wait4``;
results are cached under bench/out/quality-v2/ per method x setting x seed x phase; a rerun
computes only what is missing. bench/quality_report.py writes the BENCHMARKS.md section.

    python bench/quality.py [--jobs N] [--smoke] [--report-only] [--commit REV]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import subprocess
import sys
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import benchlib as bl
import yaml
from benchlib import ROOT, SOURCES, SPLIT_SEED, TRAINED, Runner, cached, digest, log
from quality_report import report, stop_groups

OUT = ROOT / "bench" / "out" / "quality-v2"
RM_SETTINGS = ["--lora", "--lora-layers", "4", "--max-length", "192", "--max-reply-tokens", "128",
               "--batch-size", "4", "--lr", "5e-4", "--epochs", "1", "--val-fraction", "0.2", "--seed", str(SPLIT_SEED + 2)]
STEP_KEYS = {"sft": "baseline", "dpo": "baseline", "step1": "step1", "step1_preferred": "step1",
             "step1_dispreferred": "step1", "fit": "fit"}  # run-folder stage -> config section with max_steps


@dataclass(frozen=True)
class Budget:
    """Everything that sizes a run; part of every cache key."""

    cpu_seconds: float = 600.0  # training CPU-seconds per trained method and seed (arithmetic: the report)
    train_pairs: int = 1200  # policy pool, half per source (steps x batch decide how much is read)
    rm_pairs: int = 240
    eval_pairs: int = 300  # validation pairs per source
    eval_prompts: int = 24  # validation prompts per source (generation)
    val_fraction: float = 0.2
    batch_size: int = 8
    calib_steps: int = 4
    max_new_tokens: int = 64
    windows: tuple[int, int] = (128, 64)  # prompt / reply tokens, training and scoring alike
    eval_dtype: str = "bfloat16"  # scoring and generation: 1.8x float32's speed, pair margins correlate 0.9998


SMOKE = Budget(cpu_seconds=150, train_pairs=48, rm_pairs=24, eval_pairs=6, eval_prompts=2, batch_size=4,
               calib_steps=1, max_new_tokens=8)

# Knobs of each trained method; a setting is the defaults plus a few changes. RAHF starts from
# the `rahf demo` settings (lr 1e-3 / 5e-4, alpha 2.5), 60 % of its budget to step 1.
DEFAULTS = {
    "sft": {"lr": 5e-4},
    "dpo": {"lr": 5e-4, "beta": 0.1},
    "scit": {"lr1": 5e-4, "alpha": 2.5, "share": 0.6, "capacity": "qv", "band": "default", "disjoint": 0.5, "ready": False},
    "dual": {"lr1": 1e-3, "alpha": 2.5, "share": 0.6, "capacity": "qv", "band": "default", "disjoint": 0.5,
             "ready": False, "objective": "sft", "target": "base"},
}
# name -> (changes, why); the first is the default. 4 per method: the same tuning budget.
SETTINGS: dict[str, dict[str, tuple[dict, str]]] = {
    "sft": {"lr5e-4": ({}, "the v1 setting (LoRA all-linear r16)"),
            "lr2e-4": ({"lr": 2e-4}, "lower: steps are few but may still overfit 1 reply per prompt"),
            "lr1e-3": ({"lr": 1e-3}, "higher: few steps at matched compute"),
            "lr2e-3": ({"lr": 2e-3}, "highest that stays stable on the demo data")},
    "dpo": {"lr5e-4-b0.1": ({}, "the v1 setting (moved alpacaeval +0.14 nats)"),
            "lr2e-4-b0.1": ({"lr": 2e-4}, "lower lr: v1's DPO lengthened replies"),
            "lr5e-4-b0.5": ({"beta": 0.5}, "stronger tie to the base: guards length/limit-hit"),
            "lr1e-3-b0.1": ({"lr": 1e-3}, "higher lr: few steps at matched compute")},
    "scit": {"demo": ({}, "the demo's settings"),
             "all-linear": ({"capacity": "all"}, "fit capacity like DPO's adapter (#13 point 4)"),
             "scan-band": ({"band": "scan"}, "target band from `rahf scan` (#12)"),
             "step1-80": ({"share": 0.8}, "more of the budget to step 1, which learns too little (#13 point 1)")},
    "dual": {"demo": ({}, "the demo's settings"),
             "preference": ({"objective": "preference"}, "step 1 learns what separates the replies (#13)"),
             "preferred": ({"target": "preferred"}, "align M+ as the reference code does"),
             "all-linear": ({"capacity": "all"}, "fit capacity like DPO's adapter (#13 point 4)")},
}
# Ablations of the best RAHF variant's pick: knob -> its other value.
FLIPS = {"disjoint": {0.5: 0.0, 0.0: 0.5}, "ready": {False: "until", "until": False}, "target": {"base": "preferred", "preferred": "base"},
         "objective": {"sft": "preference", "preference": "sft"}, "capacity": {"qv": "all", "all": "qv"},
         "band": {"default": "scan", "scan": "default"}}
# Ablations beyond the tuned knobs (knob -> value), where the pick has ``requires``: a knob absent
# from DEFAULTS keeps the digests, and so the cache, of every other setting.
EXTRA_ABLATIONS = [
    ("shared", True, {"objective": "preference"}),  # step 1 without the length / end-of-reply signal
    ("stop", 20.0, {}),  # fit.stop_weight: the fit keeps the base model's end-or-continue choice
    ("stop", 200.0, {}),
    ("kl", 10.0, {}),  # fit.kl_weight: the whole next-token distribution kept near the base model's
    ("anchor", 10.0, {}),  # fit.anchor_weight: the same, on the base model's own replies (on-policy)
    ("anchor", 50.0, {}),
    # step1.loss_type=sigmoid_norm at step1.beta=value: per-token means, so longer chosen replies
    # weigh no more (5 ~ 0.1 x a 50-token reply: the summed loss's first step; 20: 4x that)
    ("norm", 5.0, {"objective": "preference"}),
    ("norm", 20.0, {"objective": "preference"}),
    # step1.sft_weight=value: DPO plus the NLL of each side's preferred reply (RPO), between the
    # paper's SFT step 1 and the pick's DPO
    ("rpo", 1.0, {"objective": "preference"}),
]
# Extra ablations also run on seeds 1 and 2, each a main-table row of its own: (knob, value).
CONFIRM: list[tuple[str, Any]] = [("stop", 20.0), ("stop", 200.0), ("kl", 10.0),  # BENCHMARKS.md session 6
                                   ("target", "preferred"),  # session 7: the best seed-0 hh ablation within the length guard
                                   ("anchor", 10.0), ("anchor", 50.0),  # session 7: does the on-policy anchor hold hh where seeds 1-2 grew?
                                   ("norm", 5.0), ("norm", 20.0),  # session 8: a step 1 that cannot gain by length
                                   ("rpo", 1.0)]  # session 8: each side also imitates its replies (SFT moved hh in 3 of 3)
STRENGTHS = (0.5, 1.0, 2.0, 4.0)  # steering: multiples of the scan's suggested strength


# ------------------------------------------------------------------ data, reward model, scan


def reward_model(run: Runner, data: Path, budget: Budget) -> Path:
    """``rahf train-rm`` on the RM split (alpacaeval prompts no policy and no validation pair has)."""
    folder = data / f"reward_model-{digest(RM_SETTINGS)}"
    steps = ["--max-steps", "2"] if budget.rm_pairs < 100 else []
    cached(data / "reward_model.json", lambda: run(["train-rm", "--data", str(data / "rm_train.jsonl"), "--model", "smollm2",
                                                     "--out", str(folder), *RM_SETTINGS, *steps], data / "reward_model.log"))
    return folder


def scan(run: Runner, data: Path, budget: Budget) -> dict:
    """``rahf scan`` of the base model's instruction contrast on training pairs: the band for
    RAHF's ``band=scan`` and the vector and strength for the steering baseline."""
    folder = data / "scan"
    pairs = "64" if budget.train_pairs >= 64 else str(budget.train_pairs)
    job = cached(data / "scan-job.json", lambda: run(["scan", "--model", "smollm2", "--data", str(data / "train.jsonl"),
                                                      "--out", str(folder), "--max-pairs", pairs], data / "scan.log"))
    return {"folder": folder, "job": job, **json.loads((folder / "scan.json").read_text())["recommended"]}


# ------------------------------------------------------------------ training at matched compute


def overrides(method: str, knobs: dict, budget: Budget, seed: int, data: Path, scan_json: Path, steps: dict) -> list[str]:
    """The ``--set`` list of one training run (``steps``: config section -> max_steps)."""
    prompt, reply = budget.windows
    sets = ["model=smollm2", f"data={data / 'train.jsonl'}", "validation_fraction=0", f"seed={seed}",
            f"max_prompt_tokens={prompt}", f"max_reply_tokens={reply}", "logging_steps=5", "save_steps=1000"]
    sets += [f"{section}.train.{k}" for section, n in steps.items() for k in (f"max_steps={n}", f"batch_size={budget.batch_size}")]
    if method in ("sft", "dpo"):
        return sets + [f"baseline.train.learning_rate={knobs['lr']}"] + ([f"baseline.beta={knobs['beta']}", "baseline.precompute_ref_log_probs=false"] if method == "dpo" else [])
    sets += [f"method={method}", f"step1.train.learning_rate={knobs['lr1']}", "fit.train.learning_rate=1e-3",
             f"patterns.alpha={knobs['alpha']}", f"patterns.disjoint_share={knobs['disjoint']}"]
    if knobs["capacity"] == "all":
        sets += ["fit.lora.target_modules=[all-linear]", "fit.lora.r=16", "fit.lora.alpha=32"]
    if knobs["band"] == "scan":
        sets.append(f"patterns.scan={scan_json}")
    if method == "dual":
        sets += [f"step1.objective={knobs['objective']}", f"patterns.align_target={knobs['target']}"]
        sets += ["step1.shared_length=true"] if knobs.get("shared") else []
        sets += ["step1.loss_type=sigmoid_norm", f"step1.beta={knobs['norm']}"] if knobs.get("norm") else []
        sets += [f"step1.sft_weight={knobs['rpo']}"] if knobs.get("rpo") else []
    sets += [f"fit.stop_weight={knobs['stop']}"] if knobs.get("stop") else []
    sets += [f"fit.kl_weight={knobs['kl']}"] if knobs.get("kl") else []
    sets += [f"fit.anchor_weight={knobs['anchor']}"] if knobs.get("anchor") else []
    if not knobs["ready"]:  # readiness off: no held-out scoring (an evaluation, not training)
        return sets + ["step1.readiness_pairs=0"]
    if knobs["ready"] == "until":  # train step 1 in chunks until separated, within its share of the budget
        cap = steps.get("step1", 1)
        sets += ["step1.until_separated=true", f"step1.max_steps_cap={cap}", f"step1.chunk_steps={max(1, cap // 4)}",
                 f"step1.train.max_steps={max(1, cap // 2)}"]
    return sets


def command(method: str, run_dir: Path, sets: list[str]) -> list[str]:
    head = ["baseline", method] if method in ("sft", "dpo") else ["align"]
    return ["--quiet", *head, "--run-dir", str(run_dir), *[a for s in sets for a in ("--set", s)]]


def derive_steps(knobs: dict, short: dict, long: dict, budget: Budget) -> dict[str, int]:
    """max_steps per config section from two calibration runs (1 and 1 + calib_steps steps per
    stage): per step stage, CPU per step = the difference / calib_steps, its fixed part (model
    load, saving) = the short run's minus one step; the budget minus every fixed part is split by
    ``share`` (RAHF) and divided by the CPU per step. With ``ready="until"`` the calibration
    measures one readiness check; the up to 2 more checks of the chunks are not foreseen."""
    per: dict[str, float] = {}
    fixed = 0.0
    for stage in set(short["stage_cpu"]) | set(long["stage_cpu"]):
        a, b = short["stage_cpu"].get(stage, 0.0), long["stage_cpu"].get(stage, 0.0)
        if stage in STEP_KEYS:
            slope = max((b - a) / budget.calib_steps, 0.05 * b / (1 + budget.calib_steps), 1e-3)  # floor: timer noise
            per[STEP_KEYS[stage]] = per.get(STEP_KEYS[stage], 0.0) + slope
            fixed += max(a - slope, 0.0)
        else:  # startup, data, readiness (one check), final
            fixed += max(a, b)
    left = max(budget.cpu_seconds - fixed, 0.0)
    share = {"baseline": 1.0, "step1": knobs.get("share", 0.0), "fit": 1 - knobs.get("share", 0.0)}
    return {section: max(1, math.floor(left * share[section] / cost)) for section, cost in per.items()}


def train(run: Runner, ctx: dict, method: str, knobs: dict, seed: int) -> dict:
    """Calibrate (once per setting, seed 0), then train at the derived steps; cached."""
    budget, data = ctx["budget"], ctx["data"]
    folder = data / "runs" / f"{method}-{digest({'knobs': knobs, 'budget': asdict(budget)})}"
    scan_json = ctx["scan"]["folder"] / "scan.json"

    def calibrate() -> dict:
        sections = ["baseline"] if method in ("sft", "dpo") else ["step1", "fit"]
        runs = []
        for k in (1, 1 + budget.calib_steps):  # "until": one readiness check, at the end of step 1
            sets = overrides(method, {**knobs, "ready": bool(knobs.get("ready"))}, budget, 0, data, scan_json, dict.fromkeys(sections, k))
            shutil.rmtree(folder / f"calib{k}", ignore_errors=True)  # a resumed run would skip stages: measure afresh
            runs.append(run(command(method, folder / f"calib{k}", sets), folder / f"calib{k}.log", folder / f"calib{k}"))
            shutil.rmtree(folder / f"calib{k}", ignore_errors=True)
        return {"short": runs[0], "long": runs[1], "steps": derive_steps(knobs, *runs, budget)}

    calib = cached(folder / "calib.json", calibrate)
    run_dir = folder / f"seed{seed}"

    def fit() -> dict:
        sets = overrides(method, knobs, budget, seed, data, scan_json, calib["steps"])
        log(f"{method} {knobs} seed {seed}: training, steps {calib['steps']}")
        shutil.rmtree(run_dir, ignore_errors=True)  # CPU-seconds are measured on a whole, fresh run
        return {**run(command(method, run_dir, sets), folder / f"train-seed{seed}.log", run_dir), "steps": calib["steps"],
                "knobs": knobs, "model": str(run_dir / "final" / "merged")}

    return cached(folder / f"train-seed{seed}.json", fit)


# ------------------------------------------------------------------ evaluation


def evaluate(run: Runner, ctx: dict, model: str, folder: Path, extra: list[str] = ()) -> dict:
    """``rahf eval`` on both sources' validation pairs and prompts; the numbers the report reads."""
    budget, data = ctx["budget"], ctx["data"]

    def job() -> dict:
        argv = ["eval", "--model", model, "--quiet", "--no-plots", "--dtype", budget.eval_dtype, "--out", str(folder / "eval"),
                "--max-prompt-tokens", str(budget.windows[0]), "--max-reply-tokens", str(budget.windows[1]),
                "--max-new-tokens", str(budget.max_new_tokens), "--reward-model", str(ctx["rm"]),
                "--cache-dir", str(ctx["out"] / "generations"), *extra]
        for source, (_, harmful) in SOURCES.items():
            argv += ["--pairs", str(data / f"val_{source}.jsonl"),
                     "--harmful-prompts" if harmful else "--prompts", str(data / f"prompts_{source}.jsonl")]
        result = run(argv, folder / "eval.log")
        report = json.loads((folder / "eval" / "report.json").read_text())
        sources = {}
        for source in SOURCES:
            pref = next(p for p in report["preference"] if p["source"].endswith(f"val_{source}.jsonl"))
            gen = next(g for g in report["generation"] if g["source"].endswith(f"prompts_{source}.jsonl"))
            sources[source] = {"accuracy": pref["accuracy"], "pair_margins": pref["pair_margins"], "behaviour": gen["behaviour"],
                               "rewards": gen["rewards"], "lengths": gen["lengths_chars"]}
        return {**result, "model": model, "extra": list(extra), "sources": sources}

    return cached(folder / "eval.json", job)


# ------------------------------------------------------------------ the queue


def free_baselines(args: argparse.Namespace, ctx: dict, run: Runner) -> dict[tuple[str, str], tuple[Path, list[str]]]:
    """Prompting (I+ as rahf's config has it, as the system prompt) and steering with the scan's
    vector at its layers, at multiples of its suggested strength: (folder, ``rahf eval`` flags)."""
    def cli(*argv: str) -> str:
        return subprocess.run([sys.executable, "-m", "rahf.cli", *argv], env=run.env, capture_output=True, text=True).stdout

    if not (args.report_only or "--steer" in cli("eval", "--help")):  # rahf eval's treatments: commit 00c5035
        return {}
    free, data, scan = {}, ctx["data"], ctx["scan"]
    if "prompt" in args.methods:
        instruction = "" if args.report_only else yaml.safe_load(cli("config"))["preferred_instruction"]
        free[("prompt", "I+")] = (data / "free" / "prompt", ["--instruction", instruction])
    for k in STRENGTHS[: 1 if args.smoke else 4] if "steer" in args.methods else ():
        free[("steer", f"x{k:g}")] = (data / "free" / f"steer-x{k:g}", [
            "--steer", str(scan["folder"] / "vectors.safetensors"), "--strength", f"{k * scan['strength']['suggested']:.4g}",
            "--layers", ",".join(map(str, scan["target_layers"]))])
    return free


def run_queue(args: argparse.Namespace, ctx: dict, run: Runner) -> dict:
    """Seed-0 tuning and the free baselines, then the other seeds at each pick and the ablations
    of the best RAHF variant; computes what is missing (``--report-only``: nothing)."""
    budget, data, base, pool = ctx["budget"], ctx["data"], ctx["base"], ThreadPoolExecutor(max_workers=args.jobs)
    state: dict[str, Any] = {"tune": {}, "seeds": {}, "ablate": {}, "confirm": {}, "free": {}, "failed": [], "variants": CONFIRM}
    methods = [m for m in args.methods if m in TRAINED]

    def guarded(label: str, fn: Any, *a: Any) -> Any:
        try:
            return fn(*a)
        except Exception as err:  # one failed job must not stop the queue; a rerun retries it
            log(f"FAILED {label}: {err}")
            state["failed"].append(f"{label}: {str(err).splitlines()[0]}")
            return None

    def chain(method: str, knobs: dict, seed: int) -> dict | None:
        folder = data / "runs" / f"{method}-{digest({'knobs': knobs, 'budget': asdict(budget)})}"
        paths = [folder / f"train-seed{seed}.json", folder / f"eval-seed{seed}" / "eval.json"]
        if args.report_only:
            return {"train": json.loads(paths[0].read_text()), "eval": json.loads(paths[1].read_text())} if all(p.exists() for p in paths) else None
        trained = train(run, ctx, method, knobs, seed)
        log(f"{method} seed {seed}: evaluating")
        result = {"train": trained, "eval": evaluate(run, ctx, trained["model"], folder / f"eval-seed{seed}")}
        for heavy in [Path(trained["model"]), *Path(trained["model"]).parents[1].glob("*/checkpoints")]:  # disk: keep adapters
            shutil.rmtree(heavy, ignore_errors=True)
        return result

    def submit(part: str, key: tuple, label: str, fn: Any, *a: Any) -> None:
        jobs.append((part, key, pool.submit(guarded, label, fn, *a)))

    def collect() -> None:
        for part, key, future in jobs:
            state[part][key] = future.result()
        jobs.clear()

    def knobs_of(method: str, name: str) -> dict:
        return {**DEFAULTS[method], **SETTINGS[method][name][0]}

    jobs: list = []
    for k in range(1 if args.smoke else 4):  # every method's default, the free baselines, every second setting, ...
        for m in methods:
            n = list(SETTINGS[m])[k]
            submit("tune", (m, n), f"{m} {n} seed 0", chain, m, knobs_of(m, n), 0)
        for key, (folder, extra) in free_baselines(args, ctx, run).items() if k == 0 else ():
            if args.report_only:
                state["free"][key] = json.loads((folder / "eval.json").read_text()) if (folder / "eval.json").exists() else None
            else:
                submit("free", key, " ".join(key), evaluate, run, ctx, "smollm2", folder, extra)
    picks = state["picks"] = {}
    waiting = {m: [(key, f) for part, key, f in jobs if part == "tune" and key[0] == m] for m in methods}
    while waiting:  # a method's other seeds start once its own settings are tuned, not after every method's
        ready = next((m for m, fs in waiting.items() if all(f.done() for _, f in fs)), None)
        if ready is None:
            wait([f for fs in waiting.values() for _, f in fs if not f.done()], return_when=FIRST_COMPLETED)
            continue
        for key, future in waiting.pop(ready):
            state["tune"][key] = future.result()
        picks[ready] = bl.pick_setting({n: r["eval"] for (m, n), r in state["tune"].items() if m == ready and r}, base)
        for s in [s for s in args.seeds if s != 0] if picks[ready] else ():
            submit("seeds", (ready, s), f"{ready} {picks[ready]} seed {s}", chain, ready, knobs_of(ready, picks[ready]), s)
    collect()
    margin = {m: sum(bl.versus_base(state["tune"][(m, picks[m])]["eval"], base)[s]["margin"]["value"] for s in SOURCES)
              for m in ("scit", "dual") if picks.get(m)}
    best = state["best"] = best_variant(margin)
    if best and not args.smoke:
        start = knobs_of(best, picks[best])
        for knob in [k for k in FLIPS if k in start]:
            submit("ablate", ("ablate", knob), f"ablation {knob}", chain, best, {**start, knob: FLIPS[knob][start[knob]]}, 0)
        for knob, value, requires in EXTRA_ABLATIONS:
            if all(start.get(k) == v for k, v in requires.items()):
                submit("ablate", ("ablate", knob, value), f"ablation {knob}={value}", chain, best, {**start, knob: value}, 0)
        for knob, value in CONFIRM:
            for s in [s for s in args.seeds if s != 0]:
                submit("confirm", (knob, value, s), f"{best} {knob}={value} seed {s}", chain, best, {**start, knob: value}, s)
    collect()
    pool.shutdown()
    return state


def best_variant(margin: dict[str, float]) -> str | None:
    """The RAHF variant whose pick moved the margin most, once both variants have a pick; None
    before (a queue run with ``--methods scit`` alone must not ablate SCIT because Dual is absent)."""
    return max(margin, key=margin.get) if set(margin) == {"scit", "dual"} else None


def budget_for(args: argparse.Namespace) -> Budget:
    """The smoke or full budget, with ``--cpu-seconds`` applied (this bench's and bench/compose.py's)."""
    budget = SMOKE if args.smoke else Budget()
    return replace(budget, cpu_seconds=args.cpu_seconds) if args.cpu_seconds else budget


def data_split(data_dir: Path, out: Path, budget: Budget) -> Path:
    """The cached split this bench trains and evaluates on (bl.prepare_splits with the budget's sizes)."""
    return bl.prepare_splits(data_dir, out, **{k: getattr(budget, k) for k in ("train_pairs", "rm_pairs", "eval_pairs", "eval_prompts", "val_fraction")})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=[*TRAINED, "prompt", "steer"], choices=[*TRAINED, "prompt", "steer"])
    p.add_argument("--cpu-seconds", type=float, help="training CPU-seconds per method and seed (default: Budget)")
    p.add_argument("--jobs", type=int, default=1, help="jobs in parallel (1 thread each)")
    p.add_argument("--commit", help="run rahf from this commit (pinned for later runs; default: the pin, else HEAD)")
    p.add_argument("--data-dir", type=Path, default=bl.DATA_DIR)
    p.add_argument("--out", type=Path, help="cache folder (default bench/out/quality-v2, or quality-v2-smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny budget end to end, 1 setting per method; writes no BENCHMARKS.md")
    p.add_argument("--report-only", action="store_true", help="write the section from the cache (missing cells: pending)")
    p.add_argument("--no-write", action="store_true", help="print the section instead of writing BENCHMARKS.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not all((args.data_dir / name).is_file() for name, _ in SOURCES.values()):
        print(f"bench/quality.py: skipped: {args.data_dir} not found (the shared data is not here)")
        return 0
    budget = budget_for(args)
    args.seeds = args.seeds[:1] if args.smoke else args.seeds
    out = args.out or OUT.with_name("quality-v2-smoke" if args.smoke else "quality-v2")
    commit, src = bl.snapshot(out, args.commit)
    sys.path.insert(0, str(src))  # the orchestrator's own rahf imports (data split, lock) too
    from benchlib import machine

    run = Runner(commit, src)
    line = "python bench/quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.report_only:  # the results themselves came from the queue
        line = f"python bench/quality.py --jobs 2   # the queue: computes and caches every job\n{line}   # this section, from the cache"
    log(f"commit {commit[:12]} from {src}; budget {asdict(budget)}")
    with contextlib.nullcontext() if args.report_only else bl.cache_lock(out):  # reading needs no lock (atomic writes)
        data = data_split(args.data_dir, out, budget)
        ctx = {"budget": budget, "data": data, "out": out, "machine": machine()}
        if args.report_only and not all((data / f).exists() for f in ("base/eval.json", "scan-job.json", "reward_model.json")):
            print("bench/quality.py: no v2 results yet; BENCHMARKS.md keeps v1's section")
            return 0
        ctx["rm"] = reward_model(run, data, budget)
        ctx["scan"] = scan(run, data, budget)
        ctx["base"] = evaluate(run, ctx, "smollm2", data / "base")
        state = run_queue(args, ctx, run)
    if args.report_only and not any(state["tune"].values()):
        print("bench/quality.py: no trained v2 result yet; BENCHMARKS.md keeps v1's section")
        return 0
    from rahf.models import load_tokenizer

    val = {s: [json.loads(x) for x in (ctx["data"] / f"val_{s}.jsonl").read_text().splitlines() if x.strip()] for s in SOURCES}
    ctx["stop_groups"] = stop_groups(val, load_tokenizer("smollm2"), budget.windows[1])
    text = report(args, ctx, state, line.strip(), {m: {n: why for n, (_, why) in v.items()} for m, v in SETTINGS.items()})
    print(text)
    if not (args.smoke or args.no_write):
        bl.write_section("quality", text)
        print(f"wrote the quality section of {bl.BENCHMARKS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
