"""rahf compose: vectors sum exactly; the 'cat' adapter merge's delta-W is the weighted sum."""

from __future__ import annotations

import json

import pytest
import torch

from rahf.cli import main
from rahf.data.schema import DataError
from rahf.steering import SteeringVectors, load_vectors
from rahf.steering.compose import compose_vectors
from rahf.steering.control_vector import save_safetensors
from rahf.testing import save_tiny


def test_vectors_compose_by_weighted_sum_missing_layers_count_zero(tmp_path, capsys):
    torch.manual_seed(0)
    a = SteeringVectors({2: torch.randn(8), 3: torch.randn(8)}, source="a", layers=[2])
    b = SteeringVectors({3: torch.randn(8), 4: torch.randn(8)}, source="b", layers=[4])
    c = compose_vectors([(a, 0.5), (b, -2.0)])
    assert sorted(c.vectors) == [2, 3, 4] and c.layers == [2, 4]
    torch.testing.assert_close(c.vectors[2], 0.5 * a.vectors[2], rtol=0, atol=0)
    torch.testing.assert_close(c.vectors[3], 0.5 * a.vectors[3] - 2.0 * b.vectors[3], rtol=0, atol=0)
    torch.testing.assert_close(c.vectors[4], -2.0 * b.vectors[4], rtol=0, atol=0)
    with pytest.raises(DataError, match="hidden size"):
        compose_vectors([(a, 1.0), (SteeringVectors({2: torch.zeros(4)}), 1.0)])
    # The CLI writes the same sum, and a GGUF of the recommended layers.
    pa, pb = save_safetensors(a, tmp_path / "a.safetensors"), save_safetensors(b, tmp_path / "b.safetensors")
    assert main(["compose", "--vectors", f"{pa}:0.5", "--vectors", f"{pb}:-2", "--out", str(tmp_path / "c")]) == 0
    back = load_vectors(tmp_path / "c" / "vectors.safetensors")
    assert all(torch.equal(back.vectors[k], c.vectors[k]) for k in c.vectors)
    assert load_vectors(tmp_path / "c" / "control_vector.gguf").layers == [2, 4]
    assert main(["compose", "--vectors", f"{pa}:x", "--out", str(tmp_path / "d")]) == 2
    assert "PATH:WEIGHT" in capsys.readouterr().err


def _adapter(model_dir, out, seed: int, r: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    lora = LoraConfig(r=r, lora_alpha=2 * r + seed, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), lora)
    model.save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(model_dir)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def _merged_weights(model_dir, adapter) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is None:
        return {k: v.clone() for k, v in base.state_dict().items()}
    return dict(PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict())


def test_adapters_compose_to_the_weighted_sum_of_weight_changes(tmp_path):
    model_dir = save_tiny(tmp_path / "tiny", layers=2)
    a = _adapter(model_dir, tmp_path / "a", seed=1, r=2)
    b = _adapter(model_dir, tmp_path / "b", seed=2, r=4)  # ranks may differ under 'cat'
    assert main(["compose", "--adapter", f"{a}:0.7", "--adapter", f"{b}:-1.5", "--out", str(tmp_path / "c")]) == 0
    base = _merged_weights(model_dir, None)
    wa, wb = _merged_weights(model_dir, a), _merged_weights(model_dir, b)
    wc = _merged_weights(model_dir, tmp_path / "c" / "adapter")
    changed = [k for k in base if not torch.equal(wa[k], base[k])]
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)
    for k in base:
        expected = base[k] + 0.7 * (wa[k] - base[k]) - 1.5 * (wb[k] - base[k])
        torch.testing.assert_close(wc[k], expected, rtol=1e-5, atol=1e-6)
    # rahf eval's loader takes the composite adapter folder.
    from rahf.evaluate.loading import load_for_eval

    model, _, info = load_for_eval(str(tmp_path / "c" / "adapter"), device="cpu")
    assert info.base is not None
    torch.testing.assert_close(model.state_dict()[changed[0]], wc[changed[0]])


def test_adapters_on_different_bases_are_refused(tmp_path, capsys):
    one = save_tiny(tmp_path / "one", layers=2)
    two = save_tiny(tmp_path / "two", layers=2, seed=3)
    a, b = _adapter(one, tmp_path / "a", seed=1, r=2), _adapter(two, tmp_path / "b", seed=2, r=2)
    assert main(["compose", "--adapter", f"{a}:1", "--adapter", f"{b}:1", "--out", str(tmp_path / "c")]) == 2
    assert "different base weights" in capsys.readouterr().err
