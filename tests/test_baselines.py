"""The SFT and DPO baselines on a tiny random model: align's layout, TRL wiring, invariants."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from fit_terms import move_adapter

from rahf.baselines import train_dpo, train_sft
from rahf.config import BaselineConfig, load_config
from rahf.testing import save_tiny, write_toy_pairs
from rahf.trainer import TrainingError

TRAIN = {"sft": train_sft, "dpo": train_dpo}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    return save_tiny(root / "tiny", layers=2), write_toy_pairs(root / "pairs.jsonl", 20)


def tiny_config(model, data, run_dir, *extra, method="sft"):
    return load_config(None, [
        f"method={method}", f"model={model}", f"data={data}", f"run_dir={run_dir}", "validation_fraction=0.2",
        "train.max_steps=3", "train.learning_rate=1e-2", "logging_steps=1",
        "max_reply_tokens=16", "device=cpu", *extra,
    ], cls=BaselineConfig)


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory):
    """Each baseline trained once for the tests that only read its outputs."""
    model_dir, data = setup
    root = tmp_path_factory.mktemp("runs")
    configs = {method: tiny_config(model_dir, data, root / method, method=method) for method in TRAIN}
    return {method: (TRAIN[method](config), config) for method, config in configs.items()}


def records(final: Path) -> list[dict]:
    return [json.loads(line) for line in (final / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_outputs_in_align_layout_and_load(setup, runs, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir, _ = setup
    final, _ = runs[method]
    for name in ("README.md", "metrics.jsonl", "loss.png", "config.yaml"):
        assert (final / name).is_file(), name
    assert f"# {method.upper()} baseline" in (final / "README.md").read_text()
    base = json.loads((final / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base).resolve() == Path(model_dir).resolve()
    assert not (final / "merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(final / "merged").eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), final / "adapter").eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-4)
    logged = records(final)
    assert [r["step"] for r in logged] == [1, 2, 3] and {r["stage"] for r in logged} == {method}


def test_dpo_starts_at_log2_and_logs_rewards(runs):
    """Policy == reference at step 1 (fresh LoRA), so the DPO loss is -log sigmoid(0) = log 2."""
    logged = records(runs["dpo"][0])
    assert logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    for record in logged:
        assert {"rewards/accuracies", "rewards/margins", "rewards/chosen"} <= record.keys()
    assert logged[-1]["rewards/margins"] > 0  # lr 1e-2 on an easy set: chosen pulls ahead


def test_sft_trains_on_reply_tokens_only_with_aligns_tokens(setup, tmp_path):
    from rahf.baselines.sft import build_sft_trainer
    from rahf.data.render import encode
    from rahf.models import load_tokenizer
    from rahf.runs import prepare_data, read_pairs

    model_dir, data = setup
    config = tiny_config(model_dir, data, tmp_path / "run", "max_reply_tokens=4")
    prepare_data(config, tmp_path, rahf_halves=False)
    pairs = read_pairs(tmp_path / "train.jsonl")
    tokenizer = load_tokenizer(str(model_dir))
    trainer = build_sft_trainer(config, pairs, tokenizer, tmp_path / "sft")
    for pair, row in zip(pairs, trainer.train_dataset, strict=True):
        encoded = encode(tokenizer, pair.prompt, pair.chosen, max_prompt_tokens=config.max_prompt_tokens, max_reply_tokens=4)
        assert row["input_ids"] == encoded.input_ids
        assert row["labels"] == [-100] * len(encoded.prompt_ids) + encoded.reply_ids


def _dpo_trainer(setup, tmp_path, *sets: str):
    """(config, training pairs, tokenizer, DPO trainer) of the tiny model with ``sets``."""
    from rahf.baselines.dpo import build_dpo_trainer
    from rahf.models import load_tokenizer
    from rahf.runs import prepare_data, read_pairs

    model_dir, data = setup
    config = tiny_config(model_dir, data, tmp_path / "run", *sets, method="dpo")
    prepare_data(config, tmp_path, rahf_halves=False)
    pairs = read_pairs(tmp_path / "train.jsonl")
    tokenizer = load_tokenizer(str(model_dir))
    return config, pairs, tokenizer, build_dpo_trainer(config, pairs, tokenizer, tmp_path / "dpo")


def test_dpo_uses_aligns_tokens_and_no_reference_copy(setup, tmp_path):
    from rahf.data.render import encode

    config, pairs, tokenizer, trainer = _dpo_trainer(setup, tmp_path, "max_reply_tokens=4", "train.max_steps=-1")
    assert trainer.ref_model is None  # LoRA: the reference is the adapter-disabled model
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(trainer.train_dataset.column_names)
    windows = {"max_prompt_tokens": config.max_prompt_tokens, "max_reply_tokens": 4}
    for pair, row in zip(pairs, trainer.train_dataset, strict=True):
        chosen = encode(tokenizer, pair.prompt, pair.chosen, **windows)
        assert (row["prompt_ids"], row["chosen_ids"]) == (chosen.prompt_ids, chosen.reply_ids)
        assert row["rejected_ids"] == encode(tokenizer, pair.prompt, pair.rejected, **windows).reply_ids


def test_rerun_skips_finished_stages(runs, capsys):
    capsys.readouterr()
    final, config = runs["dpo"]
    assert train_dpo(config) == final
    out = capsys.readouterr().out
    for stage in ("data", "dpo", "final"):
        assert f"skipping {stage}" in out


def test_nan_loss_stops_with_step_and_rerun_resumes(setup, tmp_path, monkeypatch, capsys):
    from trl import DPOTrainer

    real = DPOTrainer._compute_loss
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        loss = real(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(DPOTrainer, "_compute_loss", poisoned)
    model_dir, data = setup
    config = tiny_config(model_dir, data, tmp_path / "run", "save_steps=2", method="dpo")
    with pytest.raises(TrainingError, match=r"dpo: loss became nan at step 3; last good checkpoint: .*checkpoint-2"):
        train_dpo(config)
    monkeypatch.setattr(DPOTrainer, "_compute_loss", real)
    capsys.readouterr()
    final = train_dpo(config)
    assert "resuming from" in capsys.readouterr().out
    # the log is rebuilt from the checkpoint's history: steps 1-2 come from the stopped run
    assert [r["step"] for r in records(final)] == [1, 2, 3]


def test_reference_log_probs_are_precomputed_only_when_training_reads_every_pair(setup, tmp_path, capsys):
    from rahf.baselines.dpo import build_dpo_trainer, reads_every_pair
    from rahf.config import TrainSettings
    from rahf.data import load_preferences
    from rahf.models import load_tokenizer

    assert reads_every_pair(TrainSettings(max_steps=4, batch_size=4), 16)
    assert not reads_every_pair(TrainSettings(max_steps=3, batch_size=4), 16)
    assert reads_every_pair(TrainSettings(max_steps=2, batch_size=4, grad_accum=2), 16)
    assert reads_every_pair(TrainSettings(max_steps=1, batch_size=4), 16, world_size=4)
    assert reads_every_pair(TrainSettings(epochs=1.0), 16) and not reads_every_pair(TrainSettings(epochs=0.5), 16)

    model_dir, data = setup
    pairs, tokenizer = load_preferences(str(data)).pairs[:16], load_tokenizer(str(model_dir))
    short = build_dpo_trainer(tiny_config(model_dir, data, tmp_path / "a", method="dpo"), pairs, tokenizer, tmp_path / "a")
    assert not short.args.precompute_ref_log_probs  # 3 steps x 4 read 12 of 16 pairs
    assert "ref_chosen_logps" not in short.train_dataset.column_names
    assert "reference log-probs are computed per batch" in capsys.readouterr().out
    whole = build_dpo_trainer(tiny_config(model_dir, data, tmp_path / "b", "train.max_steps=4", method="dpo"),
                              pairs, tokenizer, tmp_path / "b")
    assert whole.args.precompute_ref_log_probs and "ref_chosen_logps" in whole.train_dataset.column_names


def test_full_finetune_writes_merged_weights_only(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir, data = setup
    final = train_sft(tiny_config(model_dir, data, tmp_path / "run", "full_finetune=true"))
    assert not (final / "adapter").exists()
    assert "full fine-tuning" in (final / "README.md").read_text()
    trained = AutoModelForCausalLM.from_pretrained(final / "merged")
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    assert not torch.equal(trained.lm_head.weight, base.lm_head.weight)


def test_full_finetune_dpo_reference_copy_starts_at_log2(setup, tmp_path):
    """Without LoRA and without precomputing, TRL loads a second copy as the reference."""
    model_dir, data = setup
    config = tiny_config(
        model_dir, data, tmp_path / "run", "full_finetune=true",
        "precompute_ref_log_probs=false", "train.max_steps=1", method="dpo",
    )
    assert records(train_dpo(config))[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)


def test_cli_dpo(setup, tmp_path):
    import yaml

    from rahf.cli import main

    model_dir, data = setup
    run_dir = tmp_path / "run"
    argv = ["baseline", "dpo", "--model", str(model_dir), "--data", str(data), "--run-dir", str(run_dir), "--max-steps", "2"]
    assert main(argv + ["--device", "cpu"]) == 0
    saved = yaml.safe_load((run_dir / "final" / "config.yaml").read_text())
    assert (saved["method"], saved["train"]["max_steps"]) == ("dpo", 2)
    assert "patterns" not in saved and "baseline" not in saved  # align's settings are not a baseline's
    assert (run_dir / "final" / "merged" / "config.json").is_file()


def test_cli_defaults_run_dir_per_method():
    from rahf.baselines.commands import baseline_config
    from rahf.cli import build_parser

    parser = build_parser()
    config = baseline_config(parser.parse_args(["baseline", "sft", "--max-steps", "3"]))
    assert (config.method, config.run_dir, config.train.max_steps) == ("sft", "runs/sft", 3)
    config = baseline_config(parser.parse_args(["baseline", "dpo", "--run-dir", "elsewhere"]))
    assert (config.method, config.run_dir, config.train.max_steps) == ("dpo", "elsewhere", -1)


@pytest.mark.parametrize(
    ("chosen", "rejected", "expected"),
    [
        ([5, 6, 7, 2], [8, 2], ([5], [8])),  # the rejected stops first: its end token goes, both keep 1 token
        ([5, 6, 7, 9], [8, 9, 4, 3], ([5, 6, 7, 9], [8, 9, 4, 3])),  # both cut by the window: unchanged
        ([5, 6, 7, 9, 1], [8, 9, 4], ([5, 6, 7], [8, 9, 4])),  # no end token inside the shared length
        ([5, 2], [8, 2], ([5], [8])),  # both stop at once: neither keeps its end token
        ([2], [8, 9, 2], ([2], [8])),  # an empty reply: one token each, never nothing
    ],
)
def test_shared_length_cuts_both_replies_to_the_shorter_without_its_end(chosen, rejected, expected):
    from rahf.baselines.dpo import shared_length

    assert shared_length(chosen, rejected, eos_id=2) == expected


def test_dpo_shared_length_trains_on_equally_long_unfinished_replies(setup, tmp_path):
    from rahf.data.render import encode_reply

    _, pairs, tokenizer, trainer = _dpo_trainer(setup, tmp_path, "max_reply_tokens=256", "shared_length=true")
    cut = 0
    for pair, row in zip(pairs, trainer.train_dataset, strict=True):
        chosen, rejected = (encode_reply(tokenizer, r, max_reply_tokens=256)[0] for r in (pair.chosen, pair.rejected))
        assert len(row["chosen_ids"]) == len(row["rejected_ids"])
        assert tokenizer.eos_token_id not in row["chosen_ids"] + row["rejected_ids"] or len(row["chosen_ids"]) == 1
        assert chosen[: len(row["chosen_ids"])] == row["chosen_ids"] and rejected[: len(row["rejected_ids"])] == row["rejected_ids"]
        cut += len(row["chosen_ids"]) < max(len(chosen), len(rejected))
    assert cut > 0  # the tiny data has pairs of unequal length: the option changed something


@pytest.mark.parametrize(("loss_type", "sft_weight"), [("sigmoid", 0.0), ("sigmoid_norm", 0.0), ("sigmoid", 0.5)])
def test_dpo_loss_type_reaches_trl_and_matches_a_hand_computed_loss(setup, tmp_path, loss_type, sft_weight):
    """sigmoid: -log sigmoid(beta (sum chosen log-ratio - sum rejected)); sigmoid_norm divides each
    sum by its reply's token count first; sft_weight adds w x the mean NLL over the batch's chosen
    tokens (RPO). Checked on a moved adapter, where they differ."""
    import torch.nn.functional as F

    beta = 3.0
    _, _, _, trainer = _dpo_trainer(setup, tmp_path, f"loss_type={loss_type}", f"beta={beta}", "train.max_steps=-1",
                                  f"sft_weight={sft_weight}", "mixed_precision=no")  # fp32: no autocast by hand
    model = trainer.model.eval()  # no dropout: the hand computation runs the same function
    move_adapter(model)
    rows = [trainer.train_dataset[i] for i in range(4)]

    def token_logps(prompt: list[int], reply: list[int]) -> torch.Tensor:
        logits = model(torch.tensor([prompt + reply])).logits[0, len(prompt) - 1 : -1].float()
        return logits.log_softmax(-1).gather(-1, torch.tensor(reply)[:, None])[:, 0]

    def reply_logps(prompt: list[int], reply: list[int]) -> torch.Tensor:
        return token_logps(prompt, reply).sum()

    def score(row: dict, side: str) -> torch.Tensor:
        with torch.no_grad():
            policy = reply_logps(row["prompt_ids"], row[f"{side}_ids"])
            with model.disable_adapter():
                reference = reply_logps(row["prompt_ids"], row[f"{side}_ids"])
        ratio = policy - reference
        return ratio / len(row[f"{side}_ids"]) if loss_type == "sigmoid_norm" else ratio

    expected = torch.stack([-F.logsigmoid(beta * (score(r, "chosen") - score(r, "rejected"))) for r in rows]).mean()
    if sft_weight:
        with torch.no_grad():
            chosen_tokens = torch.cat([token_logps(r["prompt_ids"], r["chosen_ids"]) for r in rows])
        expected = expected - sft_weight * chosen_tokens.mean()
    with torch.no_grad():
        loss = trainer.compute_loss(model, trainer.data_collator(rows))
    assert trainer.loss_types == ([loss_type, "sft"] if sft_weight else [loss_type])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert abs(expected.item() - math.log(2)) > 1e-2  # the adapter moved: the check is not at the start value
