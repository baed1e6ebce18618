"""What every benchmark shares: the machine's name, its own section of BENCHMARKS.md, a lock on
its cache folder, and the data split and scoring helpers of the quality, sensitivity and scan
benches (bench/quality.py v2 itself reaches rahf only through its CLI)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write_section(name: str, text: str, path: Path = BENCHMARKS) -> None:
    """Replace only the ``<!-- name:start -->`` ... ``<!-- name:end -->`` part of BENCHMARKS.md.

    Each benchmark owns one section, so running one never touches the others' numbers.
    """
    from rahf.io import atomic_write_text

    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = f"{start}\n{text.strip()}\n{end}"
    if not path.exists():
        atomic_write_text(path, section + "\n")
        return
    current = path.read_text()
    if start in current and end in current:
        head, rest = current.split(start, 1)
        atomic_write_text(path, head + section + rest.split(end, 1)[1])
    else:
        atomic_write_text(path, current.rstrip("\n") + "\n\n" + section + "\n")


@contextlib.contextmanager
def cache_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder/rahf.lock`` while a benchmark fills its cache folder (``rahf.runlock``):
    two runs of one benchmark on one cache would train into the same run folders. A second one
    stops with a line naming the first (exit 1); a lock left by a killed run is taken over."""
    import sys

    from rahf.runlock import RunLock, RunLocked

    lock = RunLock(folder, option="--out")
    try:
        lock.acquire()
    except RunLocked as err:
        raise SystemExit(f"bench/{Path(sys.argv[0]).name}: {err}") from None
    try:
        yield
    finally:
        lock.release()


# ---------------------------------------------------------------- shared by quality, sensitivity, scan
# (moved here from bench/quality.py v1 so quality.py v2 can depend on rahf through its CLI only)

ROOT = BENCHMARKS.parent
DATA_DIR = ROOT.parent / "shared" / "data"
# source -> (file under the data folder, are its prompts harmful requests?)
SOURCES: dict[str, tuple[str, bool]] = {
    "alpacaeval": ("alpacaeval-prefs/dev.jsonl.gz", False),
    "hh": ("hh-harmless/dev.jsonl.gz", True),
}
TRAINED = ("sft", "dpo", "scit", "dual")
LABELS = {"base": "base (no training)", "sft": "SFT", "dpo": "DPO", "scit": "RAHF-SCIT", "dual": "RAHF-Dual",
          "prompt": "prompting (I+ as system prompt)", "steer": "steering (scan vector)"}
SPLIT_SEED = 0  # the data split is fixed; seeds vary LoRA init, data order and SCIT's reply draw
# bench/quality.py v1's cache and scoring windows (bench/dual_diagnosis.py reads them)
V1_OUT = ROOT / "bench" / "out" / "quality"
V1_WINDOWS = {"max_prompt_tokens": 128, "max_reply_tokens": 64}


def digest(obj: Any) -> str:
    """Short stable hash of a JSON-able object: the cache keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def machine() -> str:
    import psutil
    import torch

    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}"
    return (f"{os.cpu_count()} CPU threads ({cpu_name()}), {psutil.virtual_memory().total / 2**30:.0f} GiB RAM,"
            " shared with other jobs, no GPU")


def interleave_by_prompt(pairs: Sequence[Any]) -> list[Any]:
    """One pair of every prompt, then a second of every prompt, ...

    alpacaeval has ~14 pairs per prompt, stored in runs: the first N pairs of the interleaved
    list cover min(N, prompts) prompts instead of N / 14.
    """
    groups: dict[str, list[Any]] = {}
    for pair in pairs:
        groups.setdefault(pair.prompt_text(), []).append(pair)
    out, depth = [], 0
    while len(out) < len(pairs):
        out += [group[depth] for group in groups.values() if len(group) > depth]
        depth += 1
    return out


def write_pairs(path: Path, pairs: Sequence[Any]) -> None:
    """TRL's conversational format, which ``load_preferences`` reads back unchanged."""
    rows = [{"prompt": list(p.prompt), "chosen": [{"role": "assistant", "content": p.chosen}],
             "rejected": [{"role": "assistant", "content": p.rejected}]} for p in pairs]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)


def mixed_splits(data_dir: Path, *, train_pairs: int, val_fraction: float | dict[str, float],
                 rm_pairs: int = 0) -> dict[str, list[Any]]:
    """The split the benches share: ``train`` (half per source), ``rm`` (alpacaeval,
    prompt-disjoint from train and validation) and ``val:<source>`` (every validation pair,
    interleaved by prompt: take the first N). ``val_fraction`` may differ per source."""
    from rahf.data import load_preferences, split_pairs

    out: dict[str, list[Any]] = {"train": [], "rm": []}
    shares = {"alpacaeval": train_pairs // 2, "hh": train_pairs - train_pairs // 2}
    for source, (name, _) in SOURCES.items():
        loaded = load_preferences(str(data_dir / name), skip_invalid=True)
        fraction = val_fraction[source] if isinstance(val_fraction, dict) else val_fraction
        train, val = split_pairs(loaded.pairs, validation_fraction=fraction, seed=SPLIT_SEED)
        if source == "alpacaeval":  # prompt-disjoint halves: policies / reward model
            train, rm_pool = split_pairs(train, validation_fraction=0.5, seed=SPLIT_SEED + 1)
            out["rm"] = interleave_by_prompt(rm_pool)[:rm_pairs]
        out["train"] += interleave_by_prompt(train)[: shares[source]]
        out[f"val:{source}"] = interleave_by_prompt(val)
    return out


def mean_spread(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value)."""
    import numpy as np

    x = np.asarray(values, dtype=float)
    return float(x.mean()), (float(x.std(ddof=1)) if len(x) > 1 else None)


def score(model_spec: str, val: dict[str, list], windows: dict[str, int]) -> dict[str, dict]:
    """Per source and pooled, from one scoring pass: preference accuracy, and the mean margin
    ``l(y+) - l(y-)`` of mean-token log-likelihoods (nats), which moves before accuracy does."""
    from rahf.evaluate.loading import load_for_eval
    from rahf.evaluate.preference import accuracy_from_scores
    from rahf.evaluate.scoring import PairScores, score_pairs
    from rahf.evaluate.stats import bootstrap

    model, tokenizer, _ = load_for_eval(model_spec, dtype="float32")
    pooled = [p for pairs in val.values() for p in pairs]
    scores = score_pairs(model, tokenizer, pooled, progress=False, **windows)
    parts, start = {}, 0
    for source, pairs in val.items():
        part = slice(start, start + len(pairs))
        start += len(pairs)
        parts[source] = PairScores(scores.chosen_sum[part], scores.chosen_tokens[part],
                                   scores.rejected_sum[part], scores.rejected_tokens[part])
    if len(val) > 1:
        parts["pooled"] = scores
    return {
        "accuracy": {k: accuracy_from_scores(v).accuracy.to_dict() for k, v in parts.items()},
        "margin": {k: bootstrap((v.chosen_mean - v.rejected_mean).double().numpy()).to_dict() for k, v in parts.items()},
        "pair_margins": (scores.chosen_mean - scores.rejected_mean).tolist(),  # pooled order, for paired deltas
    }


def margin_delta(point: dict, base: dict) -> dict:
    """Mean change of the per-pair margin from the base model, with a paired bootstrap 95% CI
    (the same pairs under both models, so pair-to-pair spread cancels)."""
    import numpy as np

    from rahf.evaluate.stats import bootstrap

    return bootstrap(np.asarray(point["pair_margins"]) - np.asarray(base["pair_margins"])).to_dict()


def source_margin_deltas(scores: dict, base: dict) -> dict[str, dict]:
    """Per source, the paired margin change from the base model (``score`` pools the sources in
    ``SOURCES`` order)."""
    out, start = {}, 0
    for source in SOURCES:
        part = slice(start, start + scores["accuracy"][source]["n"])
        start = part.stop
        out[source] = margin_delta({"pair_margins": scores["pair_margins"][part]},
                                   {"pair_margins": base["pair_margins"][part]})
    return out



# ---------------------------------------------------------------- paired statistics without importing rahf


def interval(values: Any, stat: Any = None, resamples: int = 1000, seed: int = 0) -> dict:
    """``stat`` (default: the mean) with a seeded percentile-bootstrap 95% interval over the first axis."""
    import numpy as np

    stat = stat or np.mean
    x = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    draws = np.array([stat(x[rng.integers(0, len(x), len(x))]) for _ in range(resamples)])
    return {"value": float(stat(x)), "low": float(np.quantile(draws, 0.025)),
            "high": float(np.quantile(draws, 0.975)), "n": len(x)}


def _lc(rows: Any) -> float:
    """sigmoid(theta0) of a logistic fit P(A wins) = sigmoid(theta0 + theta1 * d) (Newton, tiny L2):
    the win rate at equal length."""
    import numpy as np

    d, y = rows[:, 0], rows[:, 1]
    x, theta = np.stack([np.ones_like(d), d], axis=1), np.zeros(2)
    for _ in range(50):
        p = 1 / (1 + np.exp(-(x @ theta)))
        hess = (x * (p * (1 - p))[:, None]).T @ x / len(y) + 1e-4 * np.eye(2)
        step = np.linalg.solve(hess, x.T @ (p - y) / len(y) + 1e-4 * theta)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(1 / (1 + np.exp(-theta[0])))


def win_rates(rewards: Sequence[float], base_rewards: Sequence[float], lengths: Sequence[float],
              base_lengths: Sequence[float]) -> dict[str, dict]:
    """Reward-model win rate of A over B on the same prompts (ties 1/2) and its length-controlled
    version (AlpacaEval-style, as ``rahf eval``: d = tanh(length difference / its sd); LC =
    the fitted win rate at d = 0), with bootstrap intervals."""
    import numpy as np

    diff = np.asarray(rewards, dtype=float) - np.asarray(base_rewards, dtype=float)
    outcome = np.where(np.abs(diff) <= 1e-6, 0.5, (diff > 0).astype(float))
    gap = np.asarray(lengths, dtype=float) - np.asarray(base_lengths, dtype=float)
    d = np.tanh(gap / (gap.std() if gap.std() > 0 else 1.0))
    return {"win": interval(outcome), "lc": interval(np.stack([d, outcome], axis=1), _lc, resamples=200)}


LOCK = threading.Lock()


def log(msg: str) -> None:
    with LOCK:
        print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


# ---------------------------------------------------------------- rahf from a snapshot, as subprocess jobs


def snapshot(out: Path, commit: str | None) -> tuple[str, Path]:
    """The pinned commit (``--commit`` moves the pin) and its ``src`` tree under /tmp."""
    pin = out / "commit.json"
    rev = commit or (json.loads(pin.read_text())["commit"] if pin.exists() else "HEAD")
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", rev], capture_output=True, text=True, check=True).stdout.strip()
    src = Path(f"/tmp/qsnap-{sha[:12]}")
    if not (src / "src" / "rahf" / "cli.py").exists():
        src.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", sha, "src"], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    out.mkdir(parents=True, exist_ok=True)
    pin.write_text(json.dumps({"commit": sha}))
    return sha, src / "src"


class Runner:
    """Runs ``python -m rahf.cli ...`` from the snapshot, one thread each, and measures it."""

    def __init__(self, commit: str, src: Path) -> None:
        self.commit, self.env = commit, {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1",
                                         "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

    def __call__(self, argv: list[str], logfile: Path, run_dir: Path | None = None) -> dict:
        """CPU-seconds (user + sys, ``os.wait4``), wall, peak RSS; with ``run_dir`` also CPU per
        stage folder (polled: charged to the newest stage folder without DONE.json)."""
        import psutil

        logfile.parent.mkdir(parents=True, exist_ok=True)
        started, stages, last, load = time.time(), {}, 0.0, os.getloadavg()[0]
        with open(logfile, "w") as handle:
            proc = subprocess.Popen([sys.executable, "-m", "rahf.cli", *argv], stdout=handle, stderr=subprocess.STDOUT,
                                    cwd=ROOT, env=self.env)
            watch = psutil.Process(proc.pid)
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # reaps the job itself: its rusage
                if pid:
                    break
                if run_dir is not None:
                    try:
                        t = watch.cpu_times()
                        now = t.user + t.system
                    except psutil.Error:
                        now = last
                    open_ = [d for d in run_dir.glob("*/") if not (d / "DONE.json").exists()] if run_dir.exists() else []
                    stage = max(open_, key=lambda d: d.stat().st_ctime).name if open_ else "other"
                    stages[stage] = stages.get(stage, 0.0) + now - last
                    last = now
                time.sleep(0.5)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            tail = "\n".join(logfile.read_text().splitlines()[-15:])
            raise RuntimeError(f"rahf {argv[0]} failed (exit {code}); {logfile}:\n{tail}")
        cpu = usage.ru_utime + usage.ru_stime
        if run_dir is not None:
            stages["other"] = stages.get("other", 0.0) + max(cpu - sum(stages.values()), 0.0)
        return {"cpu_seconds": round(cpu, 1), "wall_seconds": round(time.time() - started, 1),
                "peak_rss_mb": round(usage.ru_maxrss / 1024), "stage_cpu": {k: round(v, 1) for k, v in stages.items()},
                "commit": self.commit, "load": round((load + os.getloadavg()[0]) / 2, 2)}  # 1-min load, start/end


def cached(path: Path, make: Any) -> dict:
    """The JSON at ``path``, computing and writing it first if missing."""
    if not path.exists():
        result = make()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".tmp").write_text(json.dumps(result, indent=1))
        path.with_suffix(".tmp").replace(path)
    return json.loads(path.read_text())


# ---------------------------------------------------------------- judging a model against the base model


def versus_base(result: dict, base: dict) -> dict[str, dict]:
    """Per source of two ``bench/quality.py`` eval results: the paired mean-token margin change
    from the base (bootstrap 95% CI over pairs) and the RM win rates against the base's replies."""
    import numpy as np

    out = {}
    for source in SOURCES:
        mine, theirs = result["sources"][source], base["sources"][source]
        out[source] = {"margin": interval(np.asarray(mine["pair_margins"]) - np.asarray(theirs["pair_margins"])),
                       **win_rates(mine["rewards"], theirs["rewards"], mine["lengths"], theirs["lengths"])}
    return out


def guard_excess(result: dict, base: dict) -> dict[str, float]:
    """How far past each of #13's "no gain by length or breakage" targets ``result`` is, in
    points, summed over sources (0.0: kept): reply tokens within ±10 % of base, limit-hit ≤
    base + 10 points, 4-gram repetition ≤ base + 3 points, over-refusal ≤ 5 %."""
    excess = dict.fromkeys(("length", "limit", "repetition", "over-refusal"), 0.0)
    for source in SOURCES:
        b, m = base["sources"][source]["behaviour"], result["sources"][source]["behaviour"]
        past = {"length": abs(m["mean_tokens"] / max(b["mean_tokens"], 1e-9) - 1) - 0.10,
                "limit": m["hit_limit_rate"] - b["hit_limit_rate"] - 0.10,
                "repetition": m["repetition_rate"] - b["repetition_rate"] - 0.03,
                "over-refusal": (m.get("over_refusal_rate") or 0.0) - 0.05}
        for name, value in past.items():
            excess[name] += 100 * value if value > 1e-9 else 0.0  # float slack: exactly at a bound keeps it
    return excess


def guards(result: dict, base: dict) -> dict[str, bool]:
    """Which of #13's targets ``result`` keeps on every source (:func:`guard_excess` is 0)."""
    return {name: value == 0.0 for name, value in guard_excess(result, base).items()}


def summary(evals: list[dict], base: dict) -> dict[str, dict]:
    """Per source, over seeds: accuracy, margin change (mean, sd, per-seed CIs, seeds above 0),
    win / LC, reply tokens vs base, limit-hit, repetition, refusal and over-refusal (means)."""
    vs = [versus_base(e, base) for e in evals]
    out = {}
    for s in SOURCES:
        beh = [e["sources"][s]["behaviour"] for e in evals]
        mean = {k: mean_spread([(b[k] or 0.0) for b in beh])[0]
                for k in ("mean_tokens", "hit_limit_rate", "repetition_rate", "refusal_rate", "over_refusal_rate")}
        cis = [v[s]["margin"] for v in vs]
        out[s] = {"acc": mean_spread([e["sources"][s]["accuracy"]["value"] for e in evals]), "cis": cis,
                  "dm": mean_spread([c["value"] for c in cis]), "up": sum(c["low"] > 0 for c in cis),
                  "win": mean_spread([v[s]["win"]["value"] for v in vs])[0], "lc": mean_spread([v[s]["lc"]["value"] for v in vs])[0],
                  "tokens": mean["mean_tokens"] / max(base["sources"][s]["behaviour"]["mean_tokens"], 1e-9) - 1, **mean}
    return out


def bar_plot(path: Path, series: dict[str, dict[str, tuple[float, float, float]]], ylabel: str, title: str) -> None:
    """Grouped bars: one group per label, one bar per source; (value, low, high) draws the error bar."""
    import io

    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    ax = fig.subplots()
    x, width = np.arange(len(series)), 0.8 / len(SOURCES)
    for k, source in enumerate(SOURCES):
        cells = np.array([series[label].get(source, (np.nan, np.nan, np.nan)) for label in series])
        ax.bar(x + (k - (len(SOURCES) - 1) / 2) * width, cells[:, 0], width, label=source,
               yerr=np.abs(cells[:, 1:].T - cells[:, 0]), capsize=3)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(x, list(series), rotation=20, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())


def prepare_splits(data_dir: Path, out: Path, *, train_pairs: int, rm_pairs: int, eval_pairs: int, eval_prompts: int,
                   val_fraction: float) -> Path:
    """Write the split once per settings: train pool, RM pairs, and per source the first
    ``eval_pairs`` validation pairs and ``eval_prompts`` validation prompts (JSONL with a
    ``harmful`` flag); return its folder (named by a digest of the settings and data sizes)."""
    keyed = {"train_pairs": train_pairs, "rm_pairs": rm_pairs, "eval_pairs": eval_pairs, "eval_prompts": eval_prompts,
             "val_fraction": val_fraction}
    sizes = {s: (data_dir / n).stat().st_size for s, (n, _) in SOURCES.items()}
    folder = out / f"data-{digest({'sizes': sizes, 'split_seed': SPLIT_SEED, **keyed})}"
    if (folder / "manifest.json").exists():
        return folder
    splits = mixed_splits(data_dir, train_pairs=train_pairs, val_fraction=val_fraction, rm_pairs=rm_pairs)
    write_pairs(folder / "train.jsonl", splits["train"])
    write_pairs(folder / "rm_train.jsonl", splits["rm"])
    counts = {"train": len(splits["train"]), "rm": len(splits["rm"])}
    for source, (_, harmful) in SOURCES.items():
        val = splits[f"val:{source}"]
        write_pairs(folder / f"val_{source}.jsonl", val[:eval_pairs])
        prompts = list({p.prompt_text(): p.prompt for p in val}.values())[:eval_prompts]
        (folder / f"prompts_{source}.jsonl").write_text("".join(
            json.dumps({"messages": list(m), "id": str(i), "harmful": harmful}) + "\n" for i, m in enumerate(prompts)))
        counts |= {f"val_{source}": min(len(val), eval_pairs), f"prompts_{source}": len(prompts)}
    (folder / "manifest.json").write_text(json.dumps({"counts": counts, "settings": keyed}, indent=1))
    return folder


def pick_setting(tried: dict[str, dict], base: dict) -> str | None:
    """The tuning rule: the highest mean paired margin change over both sources among the
    settings that keep every guard; if none does, among those that exceed the guards least
    (points past them, summed: :func:`guard_excess`, to 0.1), the highest. (Until 2026-12-01
    the fallback was the highest margin overall, which picked a setting with 49 % repeated
    4-grams: a gain by breakage, which #13 says is not a gain.)"""
    if not tried:
        return None
    score = {name: sum(versus_base(r, base)[s]["margin"]["value"] for s in SOURCES) / len(SOURCES) for name, r in tried.items()}
    excess = {name: round(sum(guard_excess(r, base).values()), 1) for name, r in tried.items()}
    least = min(excess.values())
    return max((n for n in tried if excess[n] == least), key=score.get)
