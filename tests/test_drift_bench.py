"""bench/drift.py: how far a model moved from the base, on teacher-forced held-out replies."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import drift  # noqa: E402

from rahf.data.schema import PreferencePair  # noqa: E402
from rahf.method.fit import stop_kl  # noqa: E402
from rahf.testing import tiny_model, tiny_tokenizer  # noqa: E402

ROWS = [
    PreferencePair(({"role": "user", "content": "Say hi."},), "Hi there!", "No."),
    PreferencePair(({"role": "user", "content": "Add 2 and 3."},), "5.", "7."),
]


def test_a_model_has_not_drifted_from_itself_and_a_changed_one_has():
    tok = tiny_tokenizer()
    base = tiny_model(vocab_size=len(tok)).eval()
    batches = drift.chosen_batches(ROWS, tok, batch_size=1)
    assert [int(b["reply_len"][0]) for b in batches] == [len(tok("Hi there!")["input_ids"]) + 1, len(tok("5.")["input_ids"]) + 1]
    same = drift.drift(base, base, batches, [tok.eos_token_id])
    assert same == pytest.approx({"next_token_kl": 0.0, "stop_kl": 0.0}, abs=1e-6)
    moved = tiny_model(vocab_size=len(tok), seed=1).eval()
    out = drift.drift(base, moved, batches, [tok.eos_token_id])
    assert out["next_token_kl"] > 1e-4 and out["stop_kl"] > 0
    # Weighted by reply tokens: the mean over every reply token of both batches at once.
    from rahf.hidden_states import logits_at, predicting_mask

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        both = drift.chosen_batches(ROWS, tok, batch_size=2)[0]
        keep = predicting_mask(both["reply_start"], both["reply_len"], both["input_ids"].shape[1])
        expected = stop_kl(logits_at(base, both, keep), logits_at(moved, both, keep), [tok.eos_token_id]).item()
    assert out["stop_kl"] == pytest.approx(expected, rel=1e-2)
