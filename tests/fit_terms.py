"""What the tests of the fit's optional terms (tests/test_stop_term.py, tests/test_anchor.py)
share: two toy pairs, a 4-block tiny model, a trainer that computes the loss alone, and the two
moves those tests make on its adapter (tests/test_baselines.py moves its DPO adapter with
``move_adapter`` too). Test modules import the fixture
(``from fit_terms import tiny_fixture``), as with tests/shared_runs.py.
"""

from __future__ import annotations

import pytest
import torch

from rahf.config import load_config
from rahf.data.schema import PreferencePair
from rahf.method.fit import FitCollator, FitTrainer, load_fit_model
from rahf.method.patterns import fit_examples, pattern_source
from rahf.models import stop_token_ids
from rahf.testing import save_tiny, tiny_tokenizer

PAIRS = [
    PreferencePair(({"role": "user", "content": "How do I boil an egg?"},), "Boil it for nine minutes.", "No idea.", "t:1"),
    PreferencePair(({"role": "user", "content": "Say hi."},), "Hi there, nice to meet you!", "Go away.", "t:2"),
]
LAYERS = [1, 3]


@pytest.fixture(scope="module", name="tiny")
def tiny_fixture(tmp_path_factory) -> str:
    return str(save_tiny(tmp_path_factory.mktemp("model") / "tiny", layers=4))


def loss_only_trainer(tiny: str, *settings: str, kl_weight: float = 0.0, **terms):
    """``(trainer, model, frozen, batch)``: a SCIT fit on :data:`PAIRS` whose trainer computes the
    loss alone (no training loop); ``settings``: more ``--set`` values; ``terms``: more
    ``setup_fit`` arguments (``stop_weight``, ``anchor_weight``, ...)."""
    config = load_config(None, [f"model={tiny}", "method=scit", "patterns.target_layers=[1,3]", *settings])
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model, frozen = load_fit_model(config, tiny, {}, LAYERS)
    trainer = FitTrainer.__new__(FitTrainer)
    trainer.setup_fit(layers=LAYERS, alpha=config.patterns.alpha, source=pattern_source(config), frozen=frozen,
                      pad_id=tok.pad_token_id, truncate=True, batch_frozen=True, kl_weight=kl_weight,
                      stop_ids=stop_token_ids(model, tok), **terms)
    batch = FitCollator(tok.pad_token_id)(fit_examples(PAIRS, tok, config))
    return trainer, model, frozen, batch


def move_adapter(model, adapter: str = "") -> None:
    """Random B weights (seed 1, sd 0.5) for the LoRA whose parameter names hold ``adapter``:
    an adapter that moves the model."""
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name and adapter in name:
            p.data.normal_(0, 0.5)


def train_loss(trainer, model, batch, steps: int = 15) -> None:
    """``steps`` Adam steps (lr 1e-2) on ``trainer``'s loss over one batch; the model ends in eval mode."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        trainer.stage_loss(model, batch).backward()
        optimizer.step()
    model.eval()
