"""Inference-time steering: the hook adds strength * v to exactly hidden_states[l], and the CLI sweeps."""

from __future__ import annotations

import json

import pytest
import torch

from rahf.cli import main
from rahf.hidden_states import capture_blocks
from rahf.steering import SteeringVectors, steering
from rahf.steering.control_vector import save_safetensors
from rahf.testing import save_tiny, tiny_model

IDS = torch.tensor([[5, 17, 42, 99, 7, 8], [3, 4, 5, 6, 7, 9]])


def hidden_states(model) -> list[torch.Tensor]:
    """hidden_states[1..4] as the blocks output them (rahf's hooks; index 0 left empty)."""
    with torch.no_grad(), capture_blocks(model, [1, 2, 3, 4]) as captured:
        model(IDS)
    return [torch.empty(0)] + [captured[layer].clone() for layer in (1, 2, 3, 4)]


def test_steering_adds_strength_times_vector_to_that_layer_only():
    model = tiny_model(layers=4).eval()
    base = hidden_states(model)
    v = torch.randn(32)
    with steering(model, {2: v}, strength=3.0):
        steered = hidden_states(model)
    assert torch.equal(steered[1], base[1])  # below the steered layer: untouched
    assert torch.allclose(steered[2], base[2] + 3.0 * v, atol=1e-5)  # at it: exactly shifted
    assert not torch.allclose(steered[3], base[3], atol=1e-3)  # above it: carried on and changed
    after = hidden_states(model)  # hooks are gone after the block
    assert all(torch.equal(a, b) for a, b in zip(after, base, strict=True))


def test_strength_zero_and_layer_choice():
    model = tiny_model(layers=4).eval()
    base = model(IDS).logits.detach()
    vectors = {1: torch.randn(32), 3: torch.randn(32)}
    with torch.no_grad(), steering(model, vectors, strength=0.0):
        assert torch.allclose(model(IDS).logits, base)
    with torch.no_grad(), steering(model, vectors, strength=2.0, layers=[3]):
        only3 = hidden_states(model)
    with torch.no_grad(), steering(model, {3: vectors[3]}, strength=2.0):
        assert torch.allclose(hidden_states(model)[4], only3[4])
    with pytest.raises(ValueError, match="out of range"), steering(model, {5: torch.zeros(32)}):
        pass
    with pytest.raises(ValueError, match="no steering vector"), steering(model, vectors, layers=[2]):
        pass


def test_cli_sweep_prints_each_strength_and_zero_matches_generate(tmp_path, capsys):
    model_dir = save_tiny(tmp_path / "tiny", layers=3)
    torch.manual_seed(0)
    vectors = SteeringVectors({2: torch.randn(32) * 5}, model=str(model_dir), layers=[2], strength=1.0)
    path = save_safetensors(vectors, tmp_path / "v.safetensors")
    assert main(["steer", "--model", str(model_dir), "--steer", str(path), "--prompt", "Say hi.",
                 "--sweep", "0,4", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    lines = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in out.splitlines() if "s=" in line}
    assert set(lines) == {"s=0", "s=4"}
    assert main(["generate", "--model", str(model_dir), "--prompt", "Say hi.", "--max-new-tokens", "6", "--no-cache"]) == 0
    plain = capsys.readouterr().out.split("> Say hi.\n\n", 1)[1].strip()
    assert lines["s=0"] == " ".join(plain.split())
    assert main(["steer", "--model", str(model_dir), "--steer", str(path), "--prompt", "x", "--layers", "1"]) == 2
    assert "no steering vector for layers [1]" in capsys.readouterr().err


def test_generate_steer_flag_and_cache_identity(tmp_path, capsys):
    model_dir = save_tiny(tmp_path / "tiny", layers=3)
    torch.manual_seed(0)
    path = save_safetensors(SteeringVectors({2: torch.randn(32) * 20}, layers=[2], strength=1.0), tmp_path / "v.safetensors")
    common = ["generate", "--model", str(model_dir), "--prompt", "Say hi.", "--max-new-tokens", "6",
              "--cache-dir", str(tmp_path / "cache"), "--json"]

    def reply(*extra: str) -> str:
        assert main([*common, *extra]) == 0
        return json.loads(capsys.readouterr().out.splitlines()[0])["reply"]

    plain = reply()
    steered = reply("--steer", str(path))  # same cache: a steered reply must not come from it
    assert steered != plain
    assert reply("--steer", str(path), "--strength", "0") == plain
    assert reply("--steer", str(path), "--strength", "1", "--layers", "2") == steered
