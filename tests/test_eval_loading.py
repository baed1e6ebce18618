"""Models named for evaluation: plain folders and PEFT adapter folders, with stable identities."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from rahf.evaluate.loading import describe, is_adapter, load_for_eval
from rahf.models import ModelError
from rahf.testing import save_tiny


def test_adapter_folder_loads_base_plus_adapter(tmp_path):
    base = save_tiny(tmp_path / "base")
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    assert is_adapter(str(tmp_path / "adapter"))
    model, tokenizer, info = load_for_eval(str(tmp_path / "adapter"), device="cpu")
    assert info.base == str(base)
    ids = torch.tensor([tokenizer("the quick brown fox")["input_ids"]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base)(input_ids=ids).logits
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, plain)  # the adapter was applied


def test_fingerprint_changes_when_weights_change(tmp_path):
    folder = save_tiny(tmp_path / "m")
    first = describe(str(folder)).fingerprint
    assert describe(str(folder)).fingerprint == first
    save_tiny(folder, seed=3)
    assert describe(str(folder)).fingerprint != first


def test_unknown_model_is_a_user_error(tmp_path):
    with pytest.raises(ModelError):
        describe(str(tmp_path / "nothing-here"))
