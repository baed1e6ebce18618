"""Benchmark: resident memory of the fit step, step by step, over one full epoch (issue #17).

Runs ``rahf align`` (RAHF-Dual, embedded SmolLM2-135M-Instruct) on the first 400 AlpacaEval dev
pairs (plain format, ``../shared/data/alpacaeval-prefs/dev.jsonl.gz``), target layers
10,12,...,20, alpha 5, fit batch 8, windows 256 prompt / 64 reply tokens, defaults otherwise.
Step 1 is cut to 2 steps per side (``--set step1.train.max_steps=2``): the fit's memory does
not depend on how well the step-1 adapters were trained, only on their shapes.

The command runs in a subprocess (so each variant's process peak is its own) with a
``TrainerCallback`` on the fit's Trainer that reads ``/proc/self/status`` at every step end:
``VmHWM`` (the process's peak resident set since it started, step 1 included), the fit-only
peak (``VmHWM`` after resetting it through ``/proc/self/clear_refs`` when fit training begins)
and ``VmRSS`` (resident now), with the step's padded batch shape and CPU seconds.

    python bench/memory.py run --tag after [--threads 1] [--env MALLOC_ARENA_MAX=2] [--set KEY=VALUE]
    python bench/memory.py report --tags before,after [--no-write]

``run`` writes ``bench/out/memory/<tag>.json``; ``report`` renders a table of the issue's steps
and a plot (``docs/img/memory.png``) into BENCHMARKS.md. Without the data the bench says so and
exits 0.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "alpacaeval-prefs" / "dev.jsonl.gz"
OUT = ROOT / "bench" / "out" / "memory"
PLOT = ROOT / "docs" / "img" / "memory.png"
PAIRS = 400
ISSUE_STEPS = (1, 2, 3, 13, 25, 55, 65, 66, 67, 73, 89, 90, 91, 92)  # the issue's rows, and the 320-token batches
ALIGN = [
    "align", "--method", "dual", "--model", "smollm2", "--format", "plain",
    "--target-layers", "10,12,14,16,18,20", "--alpha", "5",
    "--set", "fit.train.batch_size=8", "--set", "max_prompt_tokens=256", "--set", "max_reply_tokens=64",
    "--set", "step1.train.max_steps=2",
    # The issue's pipeline: every training pair feeds step 1 and the fit, no readiness scoring
    # (later defaults split the pairs in halves and score step 1; they would change the epoch).
    "--set", "patterns.disjoint_share=0", "--set", "step1.readiness_pairs=0",
]


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB (VmHWM: peak resident set, VmRSS: resident now)."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) if match else 0


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_recorder(trainer, records: list[dict], live: Path | None = None):
    """A callback appending one record per optimizer step (and a line to ``live``, so a run cut
    short keeps its steps); the trainer's loss records the batch shape."""
    from transformers import TrainerCallback

    shape: dict = {}
    compute_loss = trainer.compute_loss

    def recording_loss(model, inputs, *args, **kwargs):
        shape["orig"] = list(inputs["orig"]["input_ids"].shape)
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording_loss

    class RSSPerStep(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.fit_peak = reset_peak()
            self.clock = time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.process_time()
            records.append({
                "step": state.global_step, "batch": shape.get("orig"), "cpu_s": round(now - self.clock, 2),
                "hwm_kb": status_kb("VmHWM"), "rss_kb": status_kb("VmRSS"), "hwm_is_fit_only": self.fit_peak,
            })
            if live is not None:
                with live.open("a") as f:
                    f.write(json.dumps(records[-1]) + "\n")
            self.clock = now

    return RSSPerStep()


def worker(argv: list[str], out: Path, process_hwm_kb: list[int]) -> int:
    """Run the rahf CLI in this process with the recorder on the fit stage's Trainer."""
    import torch

    if os.environ.get("RAHF_BENCH_FITTING"):  # a control run: another version of rahf/method/fit.py
        import importlib.util

        spec = importlib.util.spec_from_file_location("rahf.method.fit", os.environ["RAHF_BENCH_FITTING"])
        module = importlib.util.module_from_spec(spec)
        sys.modules["rahf.method.fit"] = module
        spec.loader.exec_module(module)

    import rahf.trainer
    from rahf.cli import main
    from rahf.method.fit import FitTrainer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    records: list[dict] = []
    original = rahf.trainer.train_resumably

    def train_resumably(trainer) -> None:
        if isinstance(trainer, FitTrainer):
            process_hwm_kb.append(status_kb("VmHWM"))  # the process peak before the fit trains
            live = out.with_suffix(".steps.jsonl")
            live.unlink(missing_ok=True)
            trainer.add_callback(rss_recorder(trainer, records, live))
        original(trainer)

    rahf.trainer.train_resumably = train_resumably
    code = main(argv)
    out.write_text(json.dumps({"steps": records, "hwm_before_fit_kb": process_hwm_kb[:1], "rc": code}))
    return code


def write_pairs(path: Path, n: int) -> None:
    with gzip.open(DATA, "rt") as f:
        rows = [next(f) for _ in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(rows))


def run(args: argparse.Namespace) -> int:
    if not DATA.is_file():
        print(f"bench/memory.py: {DATA} not found; skipping (this bench needs the shared AlpacaEval dev file)")
        return 0
    pairs = OUT / "pairs.jsonl"
    write_pairs(pairs, args.pairs)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env.update(kv.split("=", 1) for kv in args.env)
    argv = ALIGN + ["--data", str(pairs), "--run-dir", str(OUT / "runs" / args.tag), "--overwrite"]
    argv += [x for kv in args.set for x in ("--set", kv)]
    raw = OUT / f"{args.tag}.raw.json"
    start = time.time()
    code = subprocess.call([sys.executable, __file__, "worker", str(raw), *argv], env=env)
    result = json.loads(raw.read_text()) if raw.is_file() else {"steps": []}
    result.update({
        "tag": args.tag, "command": "rahf " + " ".join(argv),
        "env": {k: env[k] for k in sorted((set(env) - set(os.environ)) | {kv.split("=")[0] for kv in args.env})},
        "rc": code, "wall_s": round(time.time() - start, 1),
    })
    (OUT / f"{args.tag}.json").write_text(json.dumps(result, indent=1))
    for r in result["steps"]:
        print(f"step {r['step']:3d} batch {r['batch']} peak {r['hwm_kb'] / 2**20:.2f} GB rss {r['rss_kb'] / 2**20:.2f} GB cpu {r['cpu_s']} s")
    return code


def gb(kb: int) -> str:
    return f"{kb / 2**20:.2f}"


def render(results: dict[str, dict]) -> str:
    """The issue's steps: fit peak / RSS at the step end (GB), and the step's batch shape; the
    runs draw different orders, so a step's batch differs between them."""
    tags = list(results)
    lines = ["| step | " + " | ".join(f"{t}: fit peak / RSS (batch)" for t in tags) + " |", "|" + "---|" * (1 + len(tags))]
    by_step = {t: {r["step"]: r for r in res["steps"]} for t, res in results.items()}
    last = max(max(s) for s in by_step.values() if s)
    for step in [s for s in ISSUE_STEPS if s <= last]:
        cells = []
        for t in tags:
            r = by_step[t].get(step)
            cells.append(f"{gb(r['hwm_kb'])} / {gb(r['rss_kb'])} ({r['batch'][0]} x {r['batch'][1]})" if r else "-")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    peaks = []
    for t in tags:
        top = max(r["hwm_kb"] for r in results[t]["steps"])
        peaks.append(f"**{gb(top)} at step {min(r['step'] for r in results[t]['steps'] if r['hwm_kb'] == top)}**")
    lines.append("| epoch peak | " + " | ".join(peaks) + " |")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path) -> None:
    import io

    from matplotlib.figure import Figure

    from rahf.io import atomic_write_bytes

    fig = Figure(figsize=(8, 4))
    ax = fig.add_subplot()
    for tag, res in results.items():
        steps = [r["step"] for r in res["steps"]]
        line, = ax.plot(steps, [r["hwm_kb"] / 2**20 for r in res["steps"]], label=f"{tag}: peak since fit start")
        ax.plot(steps, [r["rss_kb"] / 2**20 for r in res["steps"]], ":", color=line.get_color(), label=f"{tag}: RSS now")
    ax.set_xlabel("fit step (one epoch)")
    ax.set_ylabel("GB (2^30 bytes)")
    ax.set_title("RAHF-Dual fit on 400 AlpacaEval pairs: resident memory at each step end")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())


def report(args: argparse.Namespace) -> int:
    from benchlib import cpu_name, write_section

    results = {t: json.loads((OUT / f"{t}.json").read_text()) for t in args.tags.split(",")}
    table = render(results)
    print(table)
    if args.no_write:
        return 0
    plot(results, PLOT)
    commands = "\n".join(f"- `{t}`: {' '.join(f'{k}={v}' for k, v in r['env'].items())} `{r['command']}`".replace(f"{ROOT}/", "")
                         + (f" ({r['wall_s'] / 60:.0f} min wall)" if r.get("wall_s") else "") for t, r in results.items())
    notes = Path(args.notes).read_text() if args.notes else ""
    text = (f"## Memory: the fit's resident memory over one epoch (`bench/memory.py`, issue #17)\n\n"
            f"Machine: {cpu_name()}, {os.cpu_count()} CPUs shared with other jobs, torch threads "
            f"{args.threads_note}, {date.today()}. Commands (`python bench/memory.py run --tag TAG`, then"
            f" `python bench/memory.py report --tags {args.tags}`):\n\n"
            f"{commands}\n\n{table}\n\n![fit memory per step](docs/img/memory.png)\n\n{notes}")
    write_section("memory", text)
    return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        return worker(sys.argv[3:], Path(sys.argv[2]), [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--tag", required=True)
    r.add_argument("--pairs", type=int, default=PAIRS)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p = sub.add_parser("report")
    p.add_argument("--tags", default="before,after")
    p.add_argument("--threads-note", default="1")
    p.add_argument("--notes", help="a Markdown file to append (the reading of the numbers)")
    p.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    return run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    sys.exit(main())
