"""report.json round-trips through EvalReport; markdown and comparison tables come from it; `rahf eval` end
to end."""

import json

import torch
from transformers import AutoModelForSequenceClassification

from rahf.cli import main
from rahf.evaluate.report import compare_reports, read_report, to_markdown, write_report
from rahf.testing import save_tiny, tiny_tokenizer


def estimate(value, n=10):
    return {"value": value, "low": value - 0.1, "high": value + 0.1, "n": n}


def small_report(model="smollm2"):
    return {
        "schema_version": 1,
        "settings": {"model": model, "seed": 0, "resamples": 1000, "pairs": ["a.jsonl"]},
        "environment": {"versions": {"torch": "2.13"}, "device": "cpu", "created": "now"},
        "models": {"model": {"spec": model, "path": "/m", "base": None, "fingerprint": "ab" * 32}},
        "data": [{"path": "/d/a.jsonl", "source": "d/a.jsonl", "kind": "pairs", "sha256": "cd" * 32,
                  "format": "plain", "n": 10, "invalid": {"empty_reply": 2}}],
        "preference": [{"source": "d/a.jsonl", "model": "model", "n": 10, "accuracy": estimate(0.6),
                        "accuracy_summed": estimate(0.4), "implicit_accuracy": None, "margin": None}],
        "reward_model_accuracy": [],
        "generation": [{"source": "d/p.jsonl", "model": "model", "n_items": 3, "n_replies": 3,
                        "behaviour": {"n": 3, "mean_tokens": 5.0, "mean_words": 4.0, "hit_limit_rate": 0.0,
                                      "repetition_rate": 0.0, "empty_rate": 0.0, "offensive_rate": 0.0,
                                      "refusal_rate": None, "n_harmful": 0, "over_refusal_rate": 0.0,
                                      "n_benign": 3},
                        "lengths_chars": [3, 4, 5], "mean_reward": estimate(0.25, 3),
                        "rewards": [0.1, 0.25, 0.4]}],
        "comparisons": [{"source": "d/p.jsonl", "win_rate": estimate(0.7, 3),
                         "length_controlled_win_rate": estimate(0.55, 3), "mean_score": estimate(0.25, 3),
                         "baseline_mean_score": estimate(0.1, 3), "wins": 2, "ties": 0, "losses": 1}],
        "timing": {"total": 1.5},
    }


def test_report_json_round_trips(tmp_path):
    report = small_report()  # written before pair_margins / mean_token_margin existed: still reads back
    paths = write_report(tmp_path, report)
    plots = [p.name for p in paths if p.suffix == ".png"]
    assert read_report(tmp_path).to_dict() == {**report, "plots": plots}
    assert json.loads((tmp_path / "report.json").read_text()) == {**report, "plots": plots}
    assert {p.name for p in paths} >= {"report.json", "report.md", "preference_accuracy.png",
                                       "score_distributions.png", "win_rates.png"}
    assert all(p.stat().st_size > 0 for p in paths)
    text = (tmp_path / "report.md").read_text()
    assert "60.0 [50.0, 70.0]" in text and "d/a.jsonl" in text and "2 / 0 / 1" in text
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_compare_makes_one_table_and_one_plot(tmp_path):
    write_report(tmp_path / "a", small_report("smollm2"), plots=False)
    other = small_report("runs/aligned")
    other["preference"][0]["accuracy"] = estimate(0.8)
    write_report(tmp_path / "b", other, plots=False)
    table = compare_reports([tmp_path / "a", tmp_path / "b"], tmp_path / "cmp")
    lines = table.splitlines()
    assert len(lines) == 4 and "accuracy: d/a.jsonl" in lines[0]
    assert "60.0" in lines[2] and "80.0" in lines[3]
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"][1][1] == "runs/aligned"


def test_markdown_handles_missing_sections():
    report = small_report()
    for key in ("preference", "generation", "comparisons"):
        report[key] = []
    assert "Provenance" in to_markdown(report)


def test_cli_eval_writes_report_markdown_and_plots(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAHF_CACHE", str(tmp_path / "cache"))
    model = save_tiny(tmp_path / "model")
    baseline = save_tiny(tmp_path / "baseline", seed=1)
    save_tiny(tmp_path / "lm")
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=1).save_pretrained(tmp_path / "rm")
    tiny_tokenizer().save_pretrained(tmp_path / "rm")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "How do I boil an egg?", "chosen": "Nine minutes in boiling water.", "rejected": "No."},
        {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away."},
        {"prompt": "Broken", "chosen": "", "rejected": "x"},  # invalid: skipped and counted
        {"prompt": "Name a fox.", "chosen": "The quick brown fox.", "rejected": "A dog."},
    ]) + "\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Tell me about the fox."},
        {"question_id": 7, "turns": ["What is 2+2?", "And 3+3?"]},
        {"prompt": "How do I hurt someone?", "harmful": True},
    ]) + "\n")
    out = tmp_path / "out"
    code = main(["eval", "--model", str(model), "--baseline", str(baseline), "--reference", str(baseline),
                 "--pairs", str(pairs), "--prompts", str(prompts), "--reward-model", str(tmp_path / "rm"),
                 "--max-new-tokens", "4", "--resamples", "50", "--quiet", "--out", str(out)])
    assert code == 0
    for name in ("report.json", "report.md", "report.html", "generations.jsonl", "preference_accuracy.png",
                 "score_distributions.png", "win_rates.png"):
        assert (out / name).stat().st_size > 0, name
    report = read_report(out).to_dict()
    assert report["data"][0]["invalid"] == {"empty_reply": 1} and report["data"][0]["n"] == 3
    assert len(report["data"][0]["sha256"]) == 64
    assert {(e["model"], e["n"]) for e in report["preference"]} == {("model", 3), ("baseline", 3)}
    assert report["preference"][0]["margin"] is not None
    assert report["generation"][0]["n_replies"] == 4  # 3 prompts, one with two turns
    assert report["generation"][0]["behaviour"]["n_harmful"] == 1
    assert report["comparisons"][0]["wins"] + report["comparisons"][0]["ties"] + report["comparisons"][0]["losses"] == 4
    assert report["reward_model_accuracy"][0]["n"] == 3
    assert report["models"]["model"]["path"] == str(model)

    assert main(["eval", "compare", str(out), str(out), "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "compare.png").is_file()
    capsys.readouterr()

    assert main(["generate", "--model", str(model), "--prompt", "Hi", "--max-new-tokens", "3", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line["prompt"] == "Hi" and line["tokens"] <= 3


def test_cli_eval_user_errors_exit_2(tmp_path, capsys):
    assert main(["eval", "--out", str(tmp_path)]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["eval", "--model", "smollm2", "--out", str(tmp_path)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(["eval", "compare", str(tmp_path / "missing")]) == 2


def test_reward_model_accuracy_is_scored_once_per_rm_and_pairs(tmp_path, monkeypatch):
    """The RM's pair accuracy depends on the RM and the pairs only: a second evaluation reads it back."""
    from types import SimpleNamespace

    from rahf.data.schema import PreferencePair
    from rahf.evaluate import run as eval_run
    from rahf.evaluate.settings import EvalConfig

    calls = []

    def scored(rm, pairs, **kwargs):
        calls.append(len(pairs))
        return {"n": len(pairs), "mean_margin": 0.25 * len(calls)}

    monkeypatch.setattr(eval_run, "pairwise_accuracy", scored)
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "model.safetensors").write_text("weights")
    rm, boot = SimpleNamespace(path=tmp_path / "rm"), {"resamples": 10, "seed": 0}
    config = EvalConfig(model="m", pairs=["p.jsonl"], cache_dir=str(tmp_path / "cache"))
    pairs = [PreferencePair(({"role": "user", "content": "Hi"},), "Hello", "Go away")]
    first = eval_run._reward_model_accuracy(config, rm, pairs, boot)
    assert eval_run._reward_model_accuracy(config, rm, pairs, boot) == first == {"n": 1, "mean_margin": 0.25}
    assert calls == [1]
    eval_run._reward_model_accuracy(config, rm, [PreferencePair(pairs[0].prompt, "Hello!", "Go away")], boot)
    eval_run._reward_model_accuracy(config, rm, pairs, {"resamples": 10, "seed": 1})
    (tmp_path / "rm" / "model.safetensors").write_text("retrained weights")
    eval_run._reward_model_accuracy(config, rm, pairs, boot)
    eval_run._reward_model_accuracy(EvalConfig(model="m", pairs=["p.jsonl"], cache=False, cache_dir=str(tmp_path / "cache")), rm, pairs, boot)
    assert calls == [1, 1, 1, 1, 1]  # other pairs, other seed, another RM, no cache: each scored afresh
