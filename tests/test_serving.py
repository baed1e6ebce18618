"""The final adapter stays servable by multi-LoRA servers (vLLM, LoRAX, TGI).

Such servers do not run PEFT: they read ``adapter_config.json`` for r, lora_alpha,
target_modules and the feature flags they refuse (vLLM's PEFTHelper rejects
``modules_to_save`` and DoRA), then load ``adapter_model.safetensors`` tensor by tensor,
matching ``base_model.model.<module path>.lora_A/B.weight`` to the base model's modules by
name. Other PEFT fields (``layers_to_transform``, dropout) are ignored, so the weights alone
must carry the whole adapter. This test checks the folder against that contract and applies
the adapter the way such a loader does, by name, to get PEFT's own outputs.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from shared_runs import aligned_run_fixture, tiny_assets_fixture  # noqa: F401  (fixtures)

KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<side>[AB])\.weight$")
PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors"}
ALLOWED_EXTRA = {"README.md"}  # the model card PEFT writes beside every adapter


@pytest.fixture(scope="module")
def final(aligned_run):
    """The final folder of the session's shared tiny Dual run (all-linear fit LoRA)."""
    return aligned_run / "final"


def test_adapter_folder_holds_only_standard_peft_files_and_fields(final):
    adapter = final / "adapter"
    files = {p.name for p in adapter.iterdir()}
    assert PEFT_FILES <= files and files <= PEFT_FILES | ALLOWED_EXTRA, files

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert not config.get("modules_to_save")  # vLLM: "only supports modules_to_save being None"
    assert config.get("use_dora", False) is False  # vLLM: "does not yet support DoRA"
    assert config.get("bias", "none") == "none"  # a LoRA bias needs vLLM's bias_enabled
    assert isinstance(config["r"], int) and config["r"] > 0 and config["lora_alpha"] > 0
    targets = config["target_modules"]
    assert targets and all(isinstance(t, str) for t in targets)
    from transformers import AutoConfig

    assert config["base_model_name_or_path"]
    AutoConfig.from_pretrained(config["base_model_name_or_path"])  # it names a loadable model


def test_weights_are_lora_pairs_named_by_module_and_apply_by_name(final):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    adapter = final / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]).eval()
    modules = dict(base.named_modules())

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = KEY.match(key)
        assert match, f"not a LoRA weight a name-based loader understands: {key}"
        pairs.setdefault(match["module"], {})[match["side"]] = tensor
    assert pairs, "the adapter has no weights"
    for name, sides in pairs.items():
        assert set(sides) == {"A", "B"}, name
        module = modules.get(name)
        assert isinstance(module, torch.nn.Linear), f"{name} is not a linear layer of the base model"
        assert name.rsplit(".", 1)[-1] in config["target_modules"]
        assert sides["A"].shape == (config["r"], module.in_features)
        assert sides["B"].shape == (module.out_features, config["r"])
    assert any(sides["B"].abs().sum() > 0 for sides in pairs.values()), "the fit left every B at zero"

    ids = torch.tensor([[5, 17, 42, 99, 7, 8, 11]])
    with torch.no_grad():
        expected = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]), adapter
        ).eval()(ids).logits
        # what a name-based server computes: W + (lora_alpha / r) * B @ A on each named module
        scale = config["lora_alpha"] / config["r"]
        for name, sides in pairs.items():
            modules[name].weight += scale * sides["B"] @ sides["A"]
        by_name = base(ids).logits
    assert torch.allclose(by_name, expected, atol=1e-5)
