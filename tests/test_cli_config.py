"""Every command's flags reach its config dataclass through the one loader (rahf.config_loader)."""

from __future__ import annotations

import argparse
import contextlib
import io
from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from rahf.config import ConfigError


def parse(*argv):
    from rahf.cli import build_parser

    return build_parser().parse_args(list(argv))


def test_align_flags_reach_their_keys():
    from rahf.commands import align_config

    config = align_config(parse(
        "align", "--method", "scit", "--model", "m", "--data", "d.csv", "--format", "plain",
        "--columns", "prompt=q,chosen=good", "--skip-invalid", "--run-dir", "r", "--seed", "3",
        "--max-pairs", "9", "--target-layers", "4,6", "--alpha", "1.5", "--max-steps", "7",
        "--targets", "cached", "--dual-storage", "full-copies", "--device", "cpu",
    ))
    assert (config.method, config.model, config.data, config.data_format) == ("scit", "m", "d.csv", "plain")
    assert config.data_columns == {"prompt": "q", "chosen": "good"}
    assert (config.skip_invalid, config.run_dir, config.seed, config.max_pairs, config.device) == (True, "r", 3, 9, "cpu")
    assert (config.patterns.target_layers, config.patterns.alpha) == ([4, 6], 1.5)
    assert (config.step1.train.max_steps, config.fit.train.max_steps) == (7, 7)  # one flag, two keys
    assert (config.fit.targets, config.step1.dual_storage) == ("cached", "full-copies")


def test_align_flag_choices_come_from_the_literal_types():
    with pytest.raises(SystemExit):
        parse("align", "--targets", "sometimes")


def test_eval_flags_reach_every_eval_config_field():
    from rahf.evaluate.commands import eval_config
    from rahf.evaluate.settings import EvalConfig

    config = eval_config(parse(
        "eval", "--model", "m", "--out", "o", "--baseline", "b", "--reference", "ref",
        "--pairs", "p1.jsonl", "--pairs", "p2.jsonl", "--prompts", "q.jsonl", "--harmful-prompts", "h.jsonl",
        "--reward-model", "rm", "--limit", "5", "--no-skip-invalid", "--columns", "prompt=question",
        "--max-new-tokens", "16", "--sample", "--temperature", "0.7", "--top-p", "0.9",
        "--instruction", "be kind", "--steer", "v.safetensors", "--strength", "2.5", "--layers", "3,5",
        "--batch-size", "2", "--max-prompt-tokens", "64", "--max-reply-tokens", "32", "--seed", "4",
        "--resamples", "10", "--no-cache", "--cache-dir", "c", "--device", "cpu", "--dtype", "float32", "--quiet",
    ))
    assert config == EvalConfig(
        model="m", out="o", baseline="b", reference="ref", pairs=["p1.jsonl", "p2.jsonl"], prompts=["q.jsonl"],
        harmful_prompts=["h.jsonl"], reward_model="rm", limit=5, skip_invalid=False, columns={"prompt": "question"},
        max_new_tokens=16, do_sample=True, temperature=0.7, top_p=0.9, instruction="be kind", steer="v.safetensors",
        steer_strength=2.5, steer_layers="3,5", batch_size=2, max_prompt_tokens=64, max_reply_tokens=32, seed=4,
        resamples=10, cache=False, cache_dir="c", device="cpu", dtype="float32", progress=False,
    )


def test_eval_defaults_and_required_flags(tmp_path):
    from rahf.evaluate.commands import eval_config
    from rahf.evaluate.settings import EvalConfig

    assert eval_config(parse("eval", "--model", "m", "--out", "o", "--pairs", "p")) == EvalConfig(model="m", out="o", pairs=["p"])
    with pytest.raises(ConfigError, match=r"^rahf eval needs --model and --out"):
        eval_config(parse("eval", "--model", "m", "--pairs", "p"))
    settings = tmp_path / "eval.yaml"
    settings.write_text("model: m\nout: o\npairs: [a.jsonl, b.jsonl]\nresamples: 50\n")
    config = eval_config(parse("eval", "--config", str(settings), "--resamples", "7"))
    assert (config.pairs, config.resamples) == (["a.jsonl", "b.jsonl"], 7)
    with pytest.raises(ConfigError, match=r"^--limit: limit must be an integer, got 'x'$"):
        eval_config(parse("eval", "--model", "m", "--out", "o", "--pairs", "p", "--limit", "x"))
    with pytest.raises(ConfigError, match=r"give --steer FILE too"):
        eval_config(parse("eval", "--model", "m", "--out", "o", "--pairs", "p", "--strength", "2"))


def test_train_rm_flags_reach_their_keys():
    from rahf.evaluate.commands import train_rm_config
    from rahf.evaluate.settings import RewardModelConfig

    config = train_rm_config(parse(
        "train-rm", "--data", "d", "--out", "o", "--model", "m", "--head-only", "--lora-layers", "2",
        "--val-fraction", "0.2", "--epochs", "2", "--max-steps", "5", "--lr", "1e-3", "--batch-size", "4",
        "--limit", "10", "--max-length", "128", "--max-reply-tokens", "64", "--format", "plain",
        "--columns", "prompt=q", "--no-skip-invalid", "--seed", "1",
    ))
    assert config == RewardModelConfig(
        data="d", out="o", model="m", method="head-only", lora_layers=2, validation_fraction=0.2, epochs=2.0,
        max_steps=5, learning_rate=1e-3, batch_size=4, limit=10, max_length=128, max_reply_tokens=64,
        data_format="plain", columns="prompt=q", skip_invalid=False, seed=1,
    )
    assert train_rm_config(parse("train-rm", "--data", "d", "--out", "o")) == RewardModelConfig(data="d", out="o")
    with pytest.raises(SystemExit):  # --lora and --head-only exclude each other
        parse("train-rm", "--data", "d", "--out", "o", "--lora", "--head-only")
    with pytest.raises(ConfigError, match="needs --data and --out"):
        train_rm_config(parse("train-rm", "--data", "d"))


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["config", "--method", "scit", "--alpha", "2"], {"method": "scit", "patterns": {"alpha": 2.0}}),
        (["config", "align", "--config", "demo-dual"], {"method": "dual", "max_pairs": None, "patterns": {"alpha": 2.5}}),
        (["config", "baseline", "dpo", "--max-steps", "3", "--set", "beta=0.2"],
         {"method": "dpo", "run_dir": "runs/dpo", "beta": 0.2, "train": {"max_steps": 3}}),
        (["config", "baseline"], {"method": "sft", "run_dir": "runs/sft"}),
        (["config", "eval", "--model", "m", "--out", "o", "--pairs", "p", "--steer", "v", "--strength", "2"],
         {"model": "m", "pairs": ["p"], "steer": "v", "steer_strength": 2.0}),
        (["config", "train-rm", "--data", "d", "--out", "o", "--head-only"], {"data": "d", "method": "head-only"}),
    ],
)
def test_rahf_config_prints_the_resolved_config_of_each_command(argv, expected):
    from rahf.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    printed = yaml.safe_load(out.getvalue())

    def subset(part, whole):
        return all(subset(v, whole[k]) if isinstance(v, dict) else whole[k] == v for k, v in part.items())

    assert subset(expected, printed), printed
    if argv[1] == "baseline":
        assert "patterns" not in printed and "baseline" not in printed


@dataclass
class Toy:
    name: str = field(default="a", metadata={"help": "the name"})
    kind: Literal["x", "y"] = "x"
    files: list[str] = field(default_factory=list)
    cache: bool = True
    verbose: bool = False
    size: int | None = None


def test_field_flags_make_switches_lists_and_choices():
    """The generated flags: --no-x for a boolean that defaults to true, repeatable lists."""
    from rahf.config_loader import add_flags, field_flags, flag_layers, load

    parser = argparse.ArgumentParser()
    flags = field_flags(Toy)
    assert [f.option for f in flags] == ["--name", "--kind", "--files", "--no-cache", "--verbose", "--size"]
    add_flags(parser, Toy, flags)
    args = parser.parse_args(["--kind", "y", "--files", "a", "--files", "b,c", "--no-cache", "--size", "3"])
    assert load(Toy, flag_layers(args)) == Toy(kind="y", files=["a", "b,c"], cache=False, size=3)
    assert load(Toy, flag_layers(parser.parse_args([]))) == Toy()
    with pytest.raises(SystemExit):
        parser.parse_args(["--kind", "z"])


def test_scan_flags_and_set_reach_scan_config(tmp_path):
    from rahf.steering.commands import scan_config
    from rahf.steering.scan import ScanConfig

    config = scan_config(parse(
        "scan", "--model", "m", "--data", "d.jsonl", "--out", "o", "--format", "plain", "--max-pairs", "8",
        "--folds", "3", "--span", "2", "--max-prompt-tokens", "32", "--max-reply-tokens", "16",
        "--replies", "both", "--precision", "fp32", "--batch-size", "2", "--seed", "5", "--device", "cpu",
        "--set", "folds=4",
    ))
    assert config == ScanConfig(model="m", data="d.jsonl", out="o", data_format="plain", max_pairs=8, folds=3, span=2,
                                max_prompt_tokens=32, max_reply_tokens=16, replies="both", precision="fp32",
                                batch_size=2, seed=5, device="cpu")  # --folds beats --set folds=4
    with pytest.raises(SystemExit):
        parse("scan", "--data", "d", "--replies", "some")
    from rahf.data.schema import DataError

    with pytest.raises(DataError, match="needs --data"):
        scan_config(parse("scan", "--out", "o"))


def test_data_inspect_measures_with_aligns_settings(tmp_path):
    """`rahf data inspect` reads align's keys: the same defaults as before, or a run's config."""
    from rahf.data.commands import inspect_config

    config = inspect_config(parse("data", "inspect", "d.jsonl"))
    assert (config.data, config.model, config.data_format, config.skip_invalid) == ("d.jsonl", "smollm2", "auto", False)
    assert (config.max_prompt_tokens, config.reply_window, config.data_split) == (256, 64, None)
    assert (config.validation_fraction, config.patterns.disjoint_share, config.seed) == (0.1, 0.5, 0)
    run = tmp_path / "run.yaml"
    run.write_text("method: scit\nmax_prompt_tokens: 128\npatterns: {disjoint_share: 0.25}\n")
    config = inspect_config(parse("data", "inspect", "d.jsonl", "--config", str(run), "--seed", "2",
                                  "--columns", "prompt=q", "--split", "test", "--max-reply-tokens", "32"))
    assert (config.max_prompt_tokens, config.reply_window, config.patterns.disjoint_share) == (128, 32, 0.25)
    assert (config.seed, config.data_columns, config.data_split) == (2, {"prompt": "q"}, "test")
    assert inspect_config(parse("data", "inspect", "d.jsonl", "--config", str(run))).reply_window == 512  # SCIT's


@pytest.mark.parametrize(("command", "row"), [
    (["baseline"], "| `train.learning_rate` | `0.0005` | peak learning rate (AdamW) |"),
    (["eval"], "| `model` | `(required)` | model to evaluate: 'smollm2', folder, hub id or adapter folder |"),
    (["train-rm"], "| `data` | `(required)` | preference data: file, folder, hub id or 'builtin' |"),
])
def test_rahf_config_markdown_for_each_command(command, row):
    from rahf.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["config", *command, "--markdown"]) == 0
    assert row in out.getvalue().splitlines()
