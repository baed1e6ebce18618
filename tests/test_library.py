"""The library path: ``rahf.align_model(model, tokenizer, pairs, config)`` on objects in memory."""

from __future__ import annotations

import pytest
import torch

from rahf.config import load_config
from rahf.data.schema import PreferencePair
from rahf.testing import tiny_model, tiny_tokenizer

PAIRS = [
    PreferencePair(({"role": "user", "content": f"What is {i} plus {i}?"},), f"{i} plus {i} is {2 * i}.",
                   f"Maybe {i + 7}, who cares.")
    for i in range(24)
]
SETTINGS = [
    "validation_fraction=0.2", "patterns.target_layers=[1,2]", "step1.train.max_steps=4", "fit.train.max_steps=8",
    "step1.train.learning_rate=1e-2", "fit.train.learning_rate=1e-2", "logging_steps=1", "max_reply_tokens=16",
    "device=cpu",
]


def tiny_pair():
    tok = tiny_tokenizer()
    model = tiny_model(vocab_size=len(tok), layers=4)
    model.config.eos_token_id, model.config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    return model, tok


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    from rahf import align_model

    root = tmp_path_factory.mktemp("library")
    model, tok = tiny_pair()
    config = load_config(None, [*SETTINGS, f"run_dir={root / 'run'}"])
    return align_model(model, tok, PAIRS, config), model, tok, config, root


def test_align_model_wraps_the_given_model_and_moves_it_along_the_pattern(aligned):
    """Dual: the adapter is put on the user's own model object, and its hidden states move toward
    the target: the shift projects positively on the preference pattern A_+ - A_-."""
    from peft import PeftModel

    from rahf.hidden_states import reply_hidden_states
    from rahf.method.fit import load_fit_model
    from rahf.method.patterns import collate_roles, fit_examples, frozen_patterns, pattern_source

    peft_model, model, tok, config, root = aligned
    assert isinstance(peft_model, PeftModel) and peft_model.get_base_model() is model
    run = root / "run"
    frozen_config = load_config(None, [*SETTINGS, f"model={run / 'inputs' / 'model'}"])
    _, frozen = load_fit_model(frozen_config, str(run / "inputs" / "model"),
                               {s: str(run / f"step1_{s}") for s in ("preferred", "dispreferred")}, [1, 2])
    batches = collate_roles(fit_examples(PAIRS[:6], tok, config), tok.pad_token_id)
    patterns = frozen_patterns(frozen, pattern_source(config), batches, [1, 2], pad_id=tok.pad_token_id)
    peft_model.eval()
    with torch.no_grad():
        after = reply_hidden_states(peft_model, batches["orig"], [1, 2])
        with peft_model.disable_adapter():
            before = reply_hidden_states(peft_model, batches["orig"], [1, 2])
    assert torch.allclose(before, patterns["orig"], atol=1e-5)  # adapter off: the original model
    mask = torch.arange(after.shape[2])[None, :] < batches["orig"]["reply_len"][:, None]
    projection = ((after - before) * (patterns["preferred"] - patterns["dispreferred"])).sum(-1)[:, mask]
    assert projection.mean() > 0


def test_align_model_gives_the_run_folder_numbers(aligned, tmp_path):
    """Same seed, same adapter as ``rahf.align`` on the same model and pairs written to disk."""
    from safetensors.torch import load_file

    from rahf.pipeline import align

    _, _, _, _, root = aligned
    model, tok = tiny_pair()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = tmp_path / "pairs.jsonl"
    data.write_text((root / "run" / "inputs" / "pairs.jsonl").read_text())
    final = align(load_config(None, [*SETTINGS, f"model={tmp_path / 'model'}", f"data={data}",
                                     f"run_dir={tmp_path / 'run'}"]))
    library = load_file(root / "run" / "final" / "adapter" / "adapter_model.safetensors")
    folder = load_file(final / "adapter" / "adapter_model.safetensors")
    assert library.keys() == folder.keys()
    for name in library:
        assert torch.equal(library[name], folder[name]), name


def test_align_model_refuses_rows_that_are_not_pairs(tmp_path):
    from rahf import align_model

    model, tok = tiny_pair()
    with pytest.raises(TypeError, match=r"pairs\[0\]"):
        align_model(model, tok, [{"prompt": "x"}], load_config(None, [*SETTINGS, f"run_dir={tmp_path / 'run'}"]))


def test_a_dataset_and_preference_pairs_are_read_back_as_the_same_pairs(tmp_path):
    import json

    from datasets import Dataset

    from rahf.data import load_preferences
    from rahf.pipeline import pair_rows

    plain = Dataset.from_list([{"prompt": p.prompt[0]["content"], "chosen": p.chosen, "rejected": p.rejected} for p in PAIRS])
    read = {}
    for name, pairs in (("objects", PAIRS), ("dataset", plain)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in pair_rows(pairs)))
        read[name] = [(p.prompt, p.chosen, p.rejected) for p in load_preferences(str(path)).pairs]
    assert read["objects"] == read["dataset"] == [(p.prompt, p.chosen, p.rejected) for p in PAIRS]


def test_other_pairs_in_the_same_run_folder_are_refused(aligned):
    from rahf import align_model
    from rahf.config import ConfigError

    _, model, tok, config, _ = aligned
    with pytest.raises(ConfigError, match="other pairs"):
        align_model(model, tok, PAIRS[:5], config)
