"""`rahf eval` free baselines: an instruction or a steering vector for the evaluated model only,
and the pair-by-pair margin change against the baseline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rahf.config import ConfigError
from rahf.data import load_preferences
from rahf.evaluate.loading import load_for_eval
from rahf.evaluate.run import EvalConfig, run_eval
from rahf.evaluate.scoring import score_pairs
from rahf.steering import SteeringVectors, steering
from rahf.steering.control_vector import save_safetensors
from rahf.testing import save_tiny, write_toy_pairs

INSTRUCTION = "Answer helpfully and harmlessly."


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("treat")
    model_dir = save_tiny(folder / "tiny", layers=3)
    pairs = write_toy_pairs(folder / "pairs.jsonl", n=10)
    torch.manual_seed(0)
    vectors = SteeringVectors({2: torch.randn(32) * 3}, layers=[2], strength=1.5)
    return model_dir, pairs, save_safetensors(vectors, folder / "v.safetensors"), vectors


def margins(model, tokenizer, pairs, **kwargs) -> np.ndarray:
    scores = score_pairs(model, tokenizer, pairs, progress=False, **kwargs)
    return (scores.chosen_mean - scores.rejected_mean).double().numpy()


def evaluate(setup, tmp_path, **kwargs) -> tuple[dict, dict]:
    model_dir, pairs, _, _ = setup
    config = EvalConfig(model=str(model_dir), baseline=str(model_dir), pairs=[str(pairs)], out=str(tmp_path),
                        resamples=50, progress=False, dtype="float32", **kwargs)
    report = run_eval(config).to_dict()  # report.json's content
    by_role = {e["model"]: e for e in report["preference"]}
    return by_role["model"], by_role["baseline"]


def test_same_model_as_baseline_moves_nothing(setup, tmp_path):
    model, baseline = evaluate(setup, tmp_path)
    assert model["pair_margins"] == baseline["pair_margins"]
    assert model["margin_vs_baseline"]["value"] == 0.0
    assert model["mean_token_margin"]["value"] == pytest.approx(np.mean(model["pair_margins"]), abs=1e-6)


def test_instruction_scores_the_model_only(setup, tmp_path):
    model_dir, pairs_file, _, _ = setup
    model, baseline = evaluate(setup, tmp_path, instruction=INSTRUCTION)
    net, tokenizer, _ = load_for_eval(str(model_dir), dtype="float32")
    pairs = load_preferences(str(pairs_file)).pairs
    with_instruction = margins(net, tokenizer, pairs, instruction=INSTRUCTION)
    plain = margins(net, tokenizer, pairs)
    assert not np.allclose(with_instruction, plain)  # the instruction changes the scores at all
    np.testing.assert_allclose(model["pair_margins"], with_instruction, atol=1e-5)
    np.testing.assert_allclose(baseline["pair_margins"], plain, atol=1e-5)
    assert model["margin_vs_baseline"]["value"] == pytest.approx(float(np.mean(with_instruction - plain)), abs=1e-5)


def test_steering_scores_the_model_only_at_the_given_strength(setup, tmp_path):
    model_dir, pairs_file, vector_file, vectors = setup
    net, tokenizer, _ = load_for_eval(str(model_dir), dtype="float32")
    pairs = load_preferences(str(pairs_file)).pairs
    with steering(net, vectors.vectors, strength=4.0, layers=[2]):
        steered = margins(net, tokenizer, pairs)
    plain = margins(net, tokenizer, pairs)
    model, baseline = evaluate(setup, tmp_path, steer=str(vector_file), steer_strength=4.0)
    np.testing.assert_allclose(model["pair_margins"], steered, atol=1e-5)
    np.testing.assert_allclose(baseline["pair_margins"], plain, atol=1e-5)
    assert not np.allclose(steered, plain)
    zero, _ = evaluate(setup, tmp_path / "zero", steer=str(vector_file), steer_strength=0.0)
    np.testing.assert_allclose(zero["pair_margins"], plain, atol=1e-6)


def test_steer_options_need_a_file(setup, tmp_path):
    model_dir, pairs, _, _ = setup
    with pytest.raises(ConfigError, match="give --steer FILE"):
        EvalConfig(model=str(model_dir), pairs=[str(pairs)], out=str(tmp_path), steer_strength=2.0)


def test_cli_flags_reach_the_report(setup, tmp_path):
    import json

    from rahf.cli import main

    model_dir, pairs, vector_file, _ = setup
    out = tmp_path / "cli"
    assert main(["eval", "--model", str(model_dir), "--baseline", str(model_dir), "--pairs", str(pairs),
                 "--out", str(out), "--steer", str(vector_file), "--strength", "0", "--layers", "2",
                 "--resamples", "20", "--quiet", "--no-plots"]) == 0
    report = json.loads((out / "report.json").read_text())
    entry = next(e for e in report["preference"] if e["model"] == "model")
    assert entry["margin_vs_baseline"]["value"] == 0.0
    assert report["models"]["model"]["steer"] == {"file": str(vector_file), "strength": 0.0, "layers": "2"}
    assert "margin - baseline (paired)" in (out / "report.md").read_text()


def test_bf16_scoring_is_close_to_float32_but_not_the_same_computation(setup):
    model_dir, pairs, _, _ = setup
    model, tokenizer, _ = load_for_eval(str(model_dir), dtype="float32")
    rows = load_preferences(str(pairs)).pairs
    fp32, bf16 = margins(model, tokenizer, rows), margins(model, tokenizer, rows, bf16=True)
    assert not np.array_equal(fp32, bf16)  # autocast really ran
    np.testing.assert_allclose(bf16, fp32, atol=0.05)
    assert next(model.parameters()).dtype == torch.float32  # the weights are left as they were
