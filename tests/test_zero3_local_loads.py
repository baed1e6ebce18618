"""Loads made by one process alone skip transformers' ZeRO-3 hook (no collective partitioning).

Under DeepSpeed ZeRO-3 transformers keeps a global config; while it is set, ``from_pretrained``
builds the model inside ``deepspeed.zero.Init``, a collective. The readiness check and export run
on the main process alone, so they must load without it. Here a stand-in ZeRO-3 config is set
(no deepspeed needed: without it installed, the hook fails at once instead of hanging); the
2-rank run is tests/reliability/test_scale_out.py.
"""

from __future__ import annotations

import pytest
import torch


class FakeZero3:
    """What transformers asks of its global DeepSpeed config object."""

    config = {"zero_optimization": {"stage": 3}}

    def is_zero3(self) -> bool:
        return True


@pytest.fixture
def zero3():
    from transformers.integrations import deepspeed as hf_deepspeed

    active = FakeZero3()  # transformers holds a weak reference only
    hf_deepspeed.set_hf_deepspeed_config(active)
    try:
        yield active
    finally:
        hf_deepspeed.unset_hf_deepspeed_config()


def test_loading_alone_unsets_and_restores_the_zero3_config(zero3):
    from transformers.integrations.deepspeed import deepspeed_config, is_deepspeed_zero3_enabled

    from rahf.models import loading_alone

    assert is_deepspeed_zero3_enabled()
    with loading_alone():
        assert not is_deepspeed_zero3_enabled()
    assert is_deepspeed_zero3_enabled() and deepspeed_config() is zero3.config
    with pytest.raises(RuntimeError), loading_alone():
        raise RuntimeError("a failed load")
    assert is_deepspeed_zero3_enabled()  # restored after an error too


def test_loading_alone_without_deepspeed_changes_nothing():
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from rahf.models import loading_alone

    with loading_alone():
        assert not is_deepspeed_zero3_enabled()
    assert not is_deepspeed_zero3_enabled()


def test_export_merges_under_a_zero3_config_with_ordinary_weights(tmp_path, zero3):
    """export.write_merged (main process only) loads the base and the adapter as plain tensors;
    without ``loading_alone`` this load would enter ZeRO-3's partitioning."""
    from peft import LoraConfig, get_peft_model

    from rahf.export import write_merged
    from rahf.testing import save_tiny, tiny_tokenizer

    base = save_tiny(tmp_path / "base", layers=2, hidden=32)
    from transformers import AutoModelForCausalLM
    from transformers.integrations import deepspeed as hf_deepspeed

    hf_deepspeed.unset_hf_deepspeed_config()  # build the adapter as a normal single process would
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path / "adapter")
    expected = model.merge_and_unload().state_dict()
    hf_deepspeed.set_hf_deepspeed_config(zero3)

    write_merged(tmp_path / "adapter", tmp_path / "merged", tiny_tokenizer())
    hf_deepspeed.unset_hf_deepspeed_config()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    assert merged.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], msg=key)
