"""How far the fit got (achieved shift, residual), the plateau stop, and fit capacity knobs."""

from __future__ import annotations

import json

import pytest
import torch
from shared_runs import aligned_run_fixture, tiny_assets_fixture  # noqa: F401  (fixtures)
from transformers import TrainerControl, TrainerState

from rahf.method.convergence import PlateauStop, measure_progress, target_progress


def test_target_progress_matches_hand_computation():
    orig = torch.zeros(2, 1, 3, 2)  # (layers, batch, reply, hidden)
    target = torch.tensor([3.0, 4.0]).expand(2, 1, 3, 2).clone()  # d = (3, 4), ||d|| = 5
    mask = torch.tensor([[True, True, False]])  # the third token is padding
    shift, residual = target_progress(target.clone(), orig, target, mask)  # h == T
    assert shift.tolist() == pytest.approx([1.0, 1.0]) and residual.tolist() == pytest.approx([0.0, 0.0])
    shift, residual = target_progress(orig.clone(), orig, target, mask)  # h == A_o
    assert shift.tolist() == pytest.approx([0.0, 0.0]) and residual.tolist() == pytest.approx([1.0, 1.0])
    # Half-way along d plus a step (4, -3) across it: shift 0.5, residual ||(-1.5,-2) + (4,-3)|| / 5.
    hidden = 0.5 * target + torch.tensor([4.0, -3.0])
    hidden[:, :, 2] = 1e6  # padding is not counted
    shift, residual = target_progress(hidden, orig, target, mask)
    assert shift.tolist() == pytest.approx([0.5, 0.5])
    assert residual.tolist() == pytest.approx([((2.5**2 + 5**2) ** 0.5) / 5] * 2)


def _logs(callback: PlateauStop, losses: list[float]) -> int | None:
    state, control = TrainerState(), TrainerControl()
    state.max_steps = 1000
    callback.on_train_begin(None, state, control)
    for step, loss in enumerate(losses, start=1):
        state.global_step = step
        callback.on_log(None, state, control, logs={"loss": loss})
        if control.should_training_stop:
            assert control.should_save  # the stop leaves a checkpoint to resume from
            return step
    return None


def test_plateau_stop_ends_a_flat_loss_and_spares_a_falling_one():
    assert _logs(PlateauStop(3, 0.01), [1.0, 0.999, 1.001, 1.0, 0.998, 1.0, 0.99]) == 6  # 2 windows of 3 logs
    assert _logs(PlateauStop(3, 0.01), [1.0 * 0.9**i for i in range(20)]) is None
    assert _logs(PlateauStop(0, 0.01), [1.0] * 20) is None  # window 0: off
    # A falling loss that flattens: the stop comes once a window fails to improve by 1%.
    assert _logs(PlateauStop(2, 0.01), [4.0, 3.0, 2.0, 1.5, 1.5, 1.5, 1.5, 1.5]) == 7


def test_plateau_history_survives_a_resume():
    callback = PlateauStop(2, 0.01)
    state, control = TrainerState(), TrainerControl()
    state.max_steps, state.log_history = 100, [{"loss": 1.0, "step": 1}, {"loss": 1.0, "step": 2}, {"loss": 1.0, "step": 3}]
    callback.on_train_begin(None, state, control)
    state.global_step = 4
    callback.on_log(None, state, control, logs={"loss": 1.0})
    assert control.should_training_stop and callback.stopped_at == 4


def test_a_fresh_adapter_has_moved_nowhere_yet(tiny_assets):
    """Before any training h == A_o: achieved shift 0 and residual 1 on every layer."""
    from rahf.config import load_config
    from rahf.data.schema import PreferencePair
    from rahf.method.fit import FitTrainer, load_fit_model
    from rahf.method.patterns import fit_examples, pattern_source
    from rahf.models import load_tokenizer

    model_dir, _ = tiny_assets
    config = load_config(None, [f"model={model_dir}", "method=scit", "patterns.target_layers=[1,3]", "max_reply_tokens=16"])
    tok = load_tokenizer(str(model_dir))
    model, frozen = load_fit_model(config, str(model_dir), {}, [1, 3])
    pairs = [PreferencePair(({"role": "user", "content": f"Add {i} and {i}."},), f"It is {2 * i}.", "No.", f"t:{i}") for i in range(5)]
    trainer = FitTrainer.__new__(FitTrainer)  # the measurement only, no training loop
    trainer.model = model
    trainer.setup_fit(layers=[1, 3], alpha=2.0, source=pattern_source(config), frozen=frozen,
                      pad_id=tok.pad_token_id, truncate=True, batch_frozen=True, kl_weight=0.0, bf16=False)
    progress = measure_progress(trainer, fit_examples(pairs, tok, config))
    assert progress == pytest.approx({"shift/L1": 0.0, "residual/L1": 1.0, "shift/L3": 0.0, "residual/L3": 1.0}, abs=1e-3)
    assert model.training  # measuring leaves the train mode as it was


def test_fit_logs_its_progress_and_the_card_states_it(aligned_run):
    """The shared run fits with ``all-linear`` LoRA of rank 16: still only in blocks 0..max(L)-1."""
    adapter = json.loads((aligned_run / "fit" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 16 and adapter["layers_to_transform"] == [0, 1]
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    fit_log = json.loads((aligned_run / "fit" / "log.json").read_text())
    assert fit_log[-1]["loss"] < fit_log[0]["loss"]
    assert all({"shift/L1", "residual/L1", "shift/L2", "residual/L2"} <= set(r) for r in fit_log)
    assert fit_log[-1]["shift/L2"] > fit_log[0]["shift/L2"]  # fitting moves h toward T
    records = [json.loads(line) for line in (aligned_run / "final" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if r["stage"] == "fit_convergence"]
    assert len(final) == 1 and final[0]["examples"] == 4 and final[0]["source"] == "validation"
    card = (aligned_run / "final" / "README.md").read_text()
    assert f"L1 {final[0]['shift/L1']:.2f} (residual {final[0]['residual/L1']:.2f})" in card
    assert "Step 3 reached, per target layer" in card
