"""``rahf align --dry-run``: every check align runs before step 1, a plan, no weights, seconds."""

from __future__ import annotations

import json

from reliability.runner import RUN_SETTINGS


def test_dry_run_validates_and_plans_without_loading_weights(tmp_path, assets, capsys, monkeypatch):
    import transformers

    import rahf.models
    from rahf.cli import main

    def no_weights(*args, **kwargs):
        raise AssertionError("--dry-run loaded weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    monkeypatch.setattr(rahf.models, "load_model", no_weights)
    model, data = assets
    run_dir = tmp_path / "run"
    code = main(["align", "--dry-run", "--json", "--model", str(model), "--data", str(data), "--run-dir", str(run_dir), *RUN_SETTINGS,
                 "--set", "patterns.disjoint_share=0"])  # every training pair feeds both steps
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["stages"] == ["step1_preferred", "step1_dispreferred", "fit", "final"]
    assert plan["steps"] == {"step1 (each side)": 4, "fit": 6}
    assert plan["examples"] == {"step1": plan["data"]["train_pairs"], "fit": 2 * plan["data"]["train_pairs"]}
    assert plan["data"]["train_pairs"] + plan["data"]["validation_pairs"] == 16
    assert plan["tokens"]["train_total"] > 0 and plan["estimated_weights_gb"] >= 0
    assert not run_dir.exists()  # nothing written


def test_plan_reads_as_a_table(tmp_path, assets):
    from rahf.config import load_config
    from rahf.preflight import format_plan, plan

    model, data = assets
    config = load_config(None, [f"model={model}", f"data={data}", f"run_dir={tmp_path / 'run'}", "method=scit",
                                "patterns.target_layers=[1,2]", "step1.train.max_steps=3", "fit.train.max_steps=5",
                                "patterns.disjoint_share=0"])  # every training pair feeds both steps
    text = format_plan(plan(config))
    lines = text.splitlines()
    assert lines[0] == "rahf align --dry-run: config and data are valid; nothing was trained"
    assert any(line.split() == ["stage", "steps", "examples"] for line in lines)
    train_pairs = plan(config)["data"]["train_pairs"]
    assert ["step1", "3", str(2 * train_pairs)] in [line.split() for line in lines]
    assert ["fit", "5", str(train_pairs)] in [line.split() for line in lines]
    assert any(line.strip().startswith("memory") and "GB" in line for line in lines)
