"""rahf scan: per-layer statistics against hand computations, readers, the band, the CLI, align."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rahf.cli import main
from rahf.config import check_against_model, load_config
from rahf.data.render import encode
from rahf.data.schema import PreferencePair
from rahf.hidden_states import pad_batch, reply_hidden_states
from rahf.instructions import DISPREFERRED_INSTRUCTION, PREFERRED_INSTRUCTION
from rahf.steering import load_vectors
from rahf.steering.readers import InstructionContrast, Patterns, Windows
from rahf.steering.scan import LayerMetrics, layer_metrics, recommend
from rahf.testing import save_tiny, tiny_model, tiny_tokenizer, write_toy_pairs

PAIRS = [
    PreferencePair(({"role": "user", "content": "How do I boil an egg?"},), "Boil it for nine minutes.", "No idea.", "t:1"),
    PreferencePair(({"role": "user", "content": "Say hi."},), "Hi there, nice to meet you!", "Go away.", "t:2"),
    PreferencePair(({"role": "user", "content": "Add 2 and 3."},), "2 + 3 = 5.", "It is 7.", "t:3"),
]


def synthetic(n: int = 20, hidden: int = 8, seed: int = 0) -> Patterns:
    """Layer 1: every difference is +u plus small noise (consistent); layer 2: random signs."""
    g = torch.Generator().manual_seed(seed)
    u = torch.zeros(hidden)
    u[0] = 1.0
    neg = torch.randn(2, n, hidden, generator=g)
    consistent = u + 0.05 * torch.randn(n, hidden, generator=g)
    signs = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)[:, None]
    random_dir = signs * u + 0.05 * torch.randn(n, hidden, generator=g)
    pos = neg + torch.stack([consistent, random_dir])
    return Patterns([1, 2], pos, neg, torch.tensor([2.0, 4.0]), list(range(n)), "synthetic")


def test_layer_metrics_separate_consistent_from_random_differences():
    patterns = synthetic()
    m = layer_metrics(patterns, folds=5)
    assert m.cv_paired_accuracy[0] == 1.0 and m.cv_cosine[0] > 0.95
    assert m.cv_paired_accuracy[1] <= 0.6 and abs(m.cv_cosine[1]) < 0.5
    # In-sample cosine and relative size by hand.
    d = patterns.differences.double()
    mean = d.mean(1)
    for i in range(2):
        cos = sum(float(d[i, k] @ mean[i] / (d[i, k].norm() * mean[i].norm())) for k in range(d.shape[1])) / d.shape[1]
        assert m.cosine[i] == pytest.approx(cos, abs=1e-6)
        assert m.relative_size[i] == pytest.approx(float(mean[i].norm()) / float(patterns.token_norm[i]))


def test_paired_accuracy_is_cross_validated_by_pair():
    """Two examples per pair with opposite differences: in-sample means cancel; held out, the
    training mean carries no information, and the folds keep each pair's examples together."""
    hidden = 4
    d = torch.zeros(1, 8, hidden)
    d[0, 0::2, 0], d[0, 1::2, 0] = 1.0, -1.0
    patterns = Patterns([1], d.clone(), torch.zeros_like(d), torch.ones(1), [i // 2 for i in range(8)], "t")
    m = layer_metrics(patterns, folds=4)
    assert m.relative_size[0] == pytest.approx(0.0)
    assert m.cv_paired_accuracy[0] == 0.0  # training mean is exactly 0: no projection is > 0


def test_recommend_picks_the_best_window_and_scales_strength():
    layers = list(range(1, 10))
    cv_cos = [0.1, 0.2, 0.3, 0.9, 0.95, 0.9, 0.2, 0.1, 0.99]  # layer 9 = N is not a candidate
    metrics = LayerMetrics(layers, [1.0] * 9, [1.0] * 9, cv_cos, cv_cos, [0.2] * 9, [1.0] * 9, [5.0] * 9)
    vectors = {layer: torch.ones(4) for layer in layers}  # |v| = 2
    rec = recommend(metrics, vectors, num_layers=9, span=3)
    assert rec["band"] == [4, 6] and rec["target_layers"] == [4, 6]
    assert rec["alpha"]["suggested"] == pytest.approx(0.25 / 0.2)
    # strength: |v_4 + v_6| = 4 over the token norm 5 at the top layer
    assert rec["strength"]["suggested"] == pytest.approx(0.25 / (4 / 5))
    assert rec["strength"]["low"] < rec["strength"]["suggested"] < rec["strength"]["high"]


def test_instruction_contrast_reads_reply_means_under_each_instruction():
    tokenizer, model = tiny_tokenizer(), tiny_model(layers=3).eval()
    windows = Windows(max_prompt_tokens=512, max_reply_tokens=16, batch_size=2, replies="chosen")
    patterns = InstructionContrast(model, tokenizer, windows=windows).read(PAIRS, [1, 3])
    assert patterns.preferred.shape == (2, 3, 32) and patterns.groups == [0, 1, 2]
    # Example 1 under I-, by hand.
    enc = encode(tokenizer, PAIRS[1].prompt, PAIRS[1].chosen, instruction=DISPREFERRED_INSTRUCTION, max_prompt_tokens=512, max_reply_tokens=16)
    with torch.no_grad():
        hidden = reply_hidden_states(model, pad_batch([enc], tokenizer.pad_token_id), [1, 3])
    torch.testing.assert_close(patterns.dispreferred[:, 1], hidden[:, 0].mean(1))
    enc = encode(tokenizer, PAIRS[1].prompt, PAIRS[1].chosen, instruction=PREFERRED_INSTRUCTION, max_prompt_tokens=512, max_reply_tokens=16)
    with torch.no_grad():
        hidden = reply_hidden_states(model, pad_batch([enc], tokenizer.pad_token_id), [1, 3])
    torch.testing.assert_close(patterns.preferred[:, 1], hidden[:, 0].mean(1))
    assert patterns.token_norm.shape == (2,) and bool((patterns.token_norm > 0).all())


def test_cli_scan_writes_outputs_and_align_takes_the_band(tmp_path, capsys):
    model_dir = save_tiny(tmp_path / "tiny", layers=6)
    data = write_toy_pairs(tmp_path / "pairs.jsonl", 10)
    out = tmp_path / "scan"
    assert main(["scan", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--span", "2",
                 "--max-reply-tokens", "16", "--max-prompt-tokens", "512", "--precision", "fp32"]) == 0
    text = capsys.readouterr().out
    assert "recommended band" in text and "rahf align --set patterns.scan=" in text
    result = json.loads((out / "scan.json").read_text())
    assert result["pairs"] == 10 and result["metrics"]["layers"] == [1, 2, 3, 4, 5, 6]
    band = result["recommended"]["target_layers"]
    assert 2 <= band[0] and band[-1] <= 5 and (out / "scan.png").stat().st_size > 1000
    vectors = load_vectors(out / "vectors.safetensors")
    assert sorted(vectors.vectors) == [1, 2, 3, 4, 5, 6] and vectors.layers == band
    assert load_vectors(out / "control_vector.gguf").layers == band
    config = load_config(None, [f"model={model_dir}", f"patterns.scan={out / 'scan.json'}"])
    assert check_against_model(config, 6) == band
    config = load_config(None, [f"model={model_dir}", f"patterns.scan={out / 'scan.json'}", "patterns.target_layers=[1]"])
    assert check_against_model(config, 6) == [1]  # explicit layers win
    assert main(["scan", "--model", str(model_dir), "--out", str(out)]) == 2
    assert "needs --data" in capsys.readouterr().err


def test_bad_scan_file_is_a_config_error(tmp_path):
    from rahf.config import ConfigError

    config = load_config(None, [f"patterns.scan={tmp_path / 'missing.json'}"])
    with pytest.raises(ConfigError, match="patterns.scan"):
        check_against_model(config, 6)
    Path(tmp_path / "x.json").write_text("{}")
    config = load_config(None, [f"patterns.scan={tmp_path / 'x.json'}"])
    with pytest.raises(ConfigError, match="recommended"):
        check_against_model(config, 6)


def test_run_reader_reads_the_dual_step1_adapters(tmp_path):
    """A Dual run's patterns: the preferred vs the dispreferred step-1 adapter, no instruction."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from rahf.steering.readers import RunReader

    model_dir = save_tiny(tmp_path / "tiny", layers=3)
    run = tmp_path / "run"
    load_config(None, [f"model={model_dir}", "method=dual", f"run_dir={run}", "max_reply_tokens=16",
                       "max_prompt_tokens=512", "device=cpu", "mixed_precision=no"]).save(run / "config.yaml")
    for seed, side in enumerate(("preferred", "dispreferred")):
        torch.manual_seed(seed)
        lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), lora).save_pretrained(run / f"step1_{side}" / "adapter")
        (run / f"step1_{side}" / "DONE.json").write_text("{}")
    patterns = RunReader(run).read(PAIRS, [1, 3])
    assert patterns.source == "run:dual" and patterns.preferred.shape == (2, 6, 32)  # Dual reads both replies
    tokenizer = tiny_tokenizer()
    enc = encode(tokenizer, PAIRS[2].prompt, PAIRS[2].rejected, max_prompt_tokens=512, max_reply_tokens=16)
    for side, got in (("preferred", patterns.preferred), ("dispreferred", patterns.dispreferred)):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), run / f"step1_{side}" / "adapter")
        with torch.no_grad():
            hidden = reply_hidden_states(model.eval(), pad_batch([enc], tokenizer.pad_token_id), [1, 3])
        torch.testing.assert_close(got[:, 5], hidden[:, 0].mean(1))
    assert not torch.allclose(patterns.preferred, patterns.dispreferred)
