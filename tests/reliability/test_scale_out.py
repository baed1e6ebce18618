"""Scale-out on 2 CPU ranks (gloo): the shipped accelerate configs give the adapters of one process.

Opt-in (``-m multiprocess``): every launch starts fresh interpreters (about a minute in all).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -m multiprocess tests/reliability/test_scale_out.py

Equivalence needs the same examples in every optimizer step. Two ranks with batch ``b`` each
take batches ``2k`` and ``2k + 1`` of the seeded sampler's order in step ``k`` (accelerate shards
batches round-robin); one process with batch ``2b`` takes exactly those examples. Every reply is
longer than ``max_reply_tokens``, so all replies have the same length and the mean of the two
ranks' per-token means (DDP averages gradients) is the one process's per-token mean. LoRA
dropout is 0, length grouping off (its groups are per-device batches, so 2 ranks and one
process would group differently), and each stage stays within its first epoch (no
wrap-around). Targets are computed on the fly, so the fit's frozen passes (base, preferred and
dispreferred, by adapter switching on one base) run inside the distributed training loop.

Tolerance ``TOL``: float32 sums in another order (gloo's all-reduce of two half-batch gradients
against one batch's), amplified by Adam where a gradient is near zero, over 4 step-1 and 6 fit
steps at learning rate 1e-2. Measured: 4.5e-6 at most; allowed 1e-4, with adapter weights of
size ~0.2. The control run (one process, batch ``b``: another schedule) must end at least
100 x ``TOL`` away, so the comparison can tell schedules apart.

FSDP on CPU: accelerate 1.15 selects FSDP only on accelerator devices. On CPU
(``Trainer(use_cpu=True)``) ``AcceleratorState`` sets ``MULTI_CPU`` before its FSDP branch,
which sits under the ``MULTI_GPU``/``MULTI_XPU``/... case, so ``fsdp.yaml`` would run as DDP
with nothing sharded (``test_fsdp_config_shards_on_cpu`` is a strict xfail that says so). rahf
refuses that launch (preflight and ``trainer_arguments``: ``rahf: error: FSDP was requested ...``)
rather than run it unsharded (``test_fsdp_config_on_cpu_is_refused``). PyTorch's FSDP2 itself
works on CPU/gloo with PEFT adapter switching
(``test_torch_fsdp2_with_adapter_switching_matches_one_process``).

DeepSpeed (not a rahf dependency; 0.19.8 installs from source here and runs on its CPU
accelerator over gloo): ZeRO-2 and ZeRO-3 match one process (tested where deepspeed is
importable). Under ZeRO-3 the rank-0-only stages (the readiness check, export) load models
outside transformers' ZeRO-3 hook (``rahf.models.loading_alone``); inside it,
``from_pretrained`` partitions every parameter collectively (``deepspeed.zero.Init``) and rank 0
waited there for rank 1, which waited in a barrier (RELIABILITY.md, "Scale-out").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from reliability.runner import ROOT, Result, finish, free_port

pytestmark = pytest.mark.multiprocess

TOL = 1e-4
ADAPTERS = ("step1_preferred/adapter", "step1_dispreferred/adapter", "final/adapter")
PER_RANK_BATCH = 2
SETTINGS = [
    "--target-layers", "1,2", "--device", "cpu", "--targets", "on-the-fly",
    "--set", "validation_fraction=0", "--set", "max_reply_tokens=8", "--set", "logging_steps=1",
    "--set", "step1.train.max_steps=4", "--set", "fit.train.max_steps=6", "--set", "save_steps=100",
    "--set", "step1.train.learning_rate=1e-2", "--set", "fit.train.learning_rate=1e-2",
    "--set", "mixed_precision=no", "--set", "step1.lora.dropout=0", "--set", "fit.lora.dropout=0",
    "--set", "fit.group_by_length=false",
]


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAHF_FAULT", None)
    return env


def _run(cmd: list[str], timeout: float = 300) -> Result:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    return finish(proc, timeout)


def _launch(config: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "accelerate" / config),
            "--num_processes", "2", "--main_process_port", str(free_port()), *args]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> tuple[Path, Path]:
    """(tiny model, 40 pairs whose replies all exceed the 8-token reply window)."""
    from rahf.testing import save_tiny

    root = tmp_path_factory.mktemp("scale_out")
    data = root / "pairs.jsonl"
    with open(data, "w") as handle:
        for i in range(40):
            handle.write(json.dumps({
                "prompt": f"What is {i} plus {i}?",
                "chosen": f"{i} plus {i} is {2 * i}, since adding a number to itself doubles it.",
                "rejected": f"Maybe {i + 7}, who cares about sums anyway.",
            }) + "\n")
    return save_tiny(root / "tiny", layers=2, hidden=32), data


def _align(assets, run_dir: Path, batch: int) -> list[str]:
    model, data = assets
    return ["-m", "rahf.cli", "align", "--model", str(model), "--data", str(data), "--run-dir", str(run_dir), *SETTINGS,
            "--set", f"step1.train.batch_size={batch}", "--set", f"fit.train.batch_size={batch}"]


def _single(assets, run_dir: Path, batch: int) -> Path:
    result = _run([sys.executable, *_align(assets, run_dir, batch)])
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, assets) -> Path:
    """One process, batch 2 x PER_RANK_BATCH: the adapters every 2-rank run must end with."""
    return _single(assets, tmp_path_factory.mktemp("one") / "run", 2 * PER_RANK_BATCH)


def differences(run_a: Path, run_b: Path) -> dict[str, float]:
    """Largest absolute weight difference of each adapter (both step-1 sides and the final one)."""
    from safetensors.torch import load_file

    out = {}
    for rel in ADAPTERS:
        a = load_file(run_a / rel / "adapter_model.safetensors")
        b = load_file(run_b / rel / "adapter_model.safetensors")
        assert a.keys() == b.keys(), rel
        out[rel] = max(float((a[k] - b[k]).abs().max()) for k in a)
    return out


def _two_ranks(assets, tmp_path: Path, config: str) -> tuple[Path, Result]:
    run_dir = tmp_path / "run"
    result = _run(_launch(config, _align(assets, run_dir, PER_RANK_BATCH)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("rahf: stage fit ...") == 2  # both ranks trained
    assert result.stdout.count("rahf: stage step1_preferred ...") == 2
    return run_dir, result


def test_control_another_schedule_ends_far_away(tmp_path, assets, one_process):
    """One process with the per-rank batch (half the examples per step) is another run: the
    tolerance below is far smaller than what a schedule difference makes."""
    other = differences(_single(assets, tmp_path / "run", PER_RANK_BATCH), one_process)
    assert min(other.values()) > 100 * TOL, other


def test_ddp_two_cpu_ranks_match_one_process(tmp_path, assets, one_process):
    run_dir, result = _two_ranks(assets, tmp_path, "ddp.yaml")
    diff = differences(run_dir, one_process)
    assert max(diff.values()) <= TOL, diff


def test_fsdp_config_on_cpu_is_refused(tmp_path, assets):
    """On CPU ranks accelerate would run ``fsdp.yaml`` as DDP, nothing sharded (module doc):
    ``rahf align`` refuses it in one line on each rank, before any stage starts."""
    result = _run(_launch("fsdp.yaml", _align(assets, tmp_path / "run", PER_RANK_BATCH)))
    assert result.returncode != 0
    assert result.stderr.count("rahf: error: FSDP was requested") == 2, result.stderr[-3000:]
    assert "configs/accelerate/ddp.yaml" in result.stderr
    assert "rahf: stage" not in result.stdout


def test_deepspeed_zero2_two_cpu_ranks_match_one_process(tmp_path, assets, one_process):
    """DeepSpeed is not a rahf dependency: this runs where it is installed (0.19.8 builds and runs
    on CPU here: its CPU accelerator over gloo)."""
    pytest.importorskip("deepspeed")
    run_dir, result = _two_ranks(assets, tmp_path, "deepspeed-zero2.yaml")
    diff = differences(run_dir, one_process)
    assert max(diff.values()) <= TOL, diff



def test_deepspeed_zero3_two_cpu_ranks_match_one_process(tmp_path, assets, one_process):
    """ZeRO-3 partitions every parameter across the ranks. The readiness check and export load
    models on rank 0 alone, outside ZeRO-3's collective partitioning (``models.loading_alone``):
    before that, rank 0 waited in ``deepspeed.zero.Init`` for rank 1, which waited in a barrier."""
    pytest.importorskip("deepspeed")
    run_dir, result = _two_ranks(assets, tmp_path, "deepspeed-zero3.yaml")
    assert "readiness" in result.stdout  # the rank-0-only check ran, and the run went on past it
    diff = differences(run_dir, one_process)
    assert max(diff.values()) <= TOL, diff

PROBE = textwrap.dedent("""
    import json, os, sys
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    args = TrainingArguments(sys.argv[2], use_cpu=True, report_to=[])  # as rahf builds them on CPU
    trainer = Trainer(model=model, args=args)
    print(json.dumps({"rank": os.environ.get("RANK"), "requested": os.environ.get("ACCELERATE_USE_FSDP"),
                      "type": trainer.accelerator.distributed_type.value, "fsdp": trainer.is_fsdp_enabled}))
""")


@pytest.mark.xfail(strict=True, reason="accelerate 1.15 picks FSDP only on accelerator devices: MULTI_CPU on CPU")
def test_fsdp_config_shards_on_cpu(tmp_path, assets):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    result = _run(_launch("fsdp.yaml", [str(probe), str(assets[0]), str(tmp_path / "out")]))
    assert result.returncode == 0, result.stderr[-3000:]
    states = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(states) == 2 and all(s["requested"] == "true" for s in states)
    assert all(s["type"] == "FSDP" and s["fsdp"] for s in states), states


FSDP2 = textwrap.dedent("""
    import os, sys, torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
    torch.manual_seed(0)  # the same LoRA init in every process
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = get_peft_model(model, lora, adapter_name="default")
    model.add_adapter("preferred", lora)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero, different per tensor, the same on every rank
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(name)))
    model.set_adapter("default")
    ids = torch.randint(0, 300, (4, 12), generator=torch.Generator().manual_seed(1))
    if world > 1:
        from torch.distributed.fsdp import fully_shard
        for block in model.base_model.model.model.layers:
            fully_shard(block)
        fully_shard(model)
        ids = ids[2 * rank : 2 * rank + 2]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with torch.no_grad():  # rahf's frozen passes: another adapter, then none, on the same modules
        model.set_adapter("preferred")
        plus = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        with model.disable_adapter():
            orig = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        model.set_adapter("default")
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    ((hidden - 2 * plus + orig) ** 2).mean().backward()
    optimizer.step()
    state = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
             for n, p in model.named_parameters() if ".default." in n}
    sharded = [type(p).__name__ for n, p in model.named_parameters() if "base_layer" in n][:1]
    if rank == 0:
        torch.save({"state": state, "sharded": sharded}, sys.argv[2])
    if world > 1:
        dist.destroy_process_group()
""")


def test_torch_fsdp2_with_adapter_switching_matches_one_process(tmp_path, assets):
    """PyTorch's FSDP2 (``fully_shard`` per decoder block) on 2 CPU ranks over gloo, with PEFT
    adapters switched between forwards as rahf's frozen passes do: one step equals the unsharded
    step. The engine works here; only accelerate's device check keeps ``fsdp.yaml`` off it."""
    import torch

    script = tmp_path / "fsdp2.py"
    script.write_text(FSDP2)
    model = str(assets[0])
    single = _run([sys.executable, str(script), model, str(tmp_path / "one.pt")])
    assert single.returncode == 0, single.stderr[-3000:]
    ranks = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                  str(free_port()), str(script), model, str(tmp_path / "two.pt")])
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["sharded"] == ["Parameter"] and two["sharded"] == ["DTensor"]  # really sharded
    assert one["state"].keys() == two["state"].keys()
    moved = max(float(v.abs().max()) for v in one["state"].values())
    assert moved > 0.01
    assert max(float((one["state"][k] - two["state"][k]).abs().max()) for k in one["state"]) <= 1e-6
