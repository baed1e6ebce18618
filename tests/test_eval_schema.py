"""The typed report: ``run_eval`` returns an ``EvalReport`` whose ``to_dict()`` is the report.json the
dict-building code wrote -- the same keys at every level and the same numbers, each rebuilt here from
the stage functions that produce it -- and ``from_dict`` reads any report back unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_eval_report import small_report
from transformers import AutoModelForSequenceClassification

from rahf.data import load_preferences
from rahf.evaluate.behaviour import behaviour_stats
from rahf.evaluate.loading import load_for_eval
from rahf.evaluate.preference import preference_accuracy
from rahf.evaluate.report import read_report, to_markdown, write_report
from rahf.evaluate.reward import compare, load_reward_model, pairwise_accuracy
from rahf.evaluate.run import EvalConfig, run_eval
from rahf.evaluate.schema import EvalReport, GenerationEntry, PreferenceEntry
from rahf.evaluate.scoring import score_pairs
from rahf.evaluate.stats import Estimate, bootstrap
from rahf.testing import save_tiny, tiny_tokenizer

RESAMPLES = 40

# The keys of each part of report.json as the dict-building run_eval (commit 00c5035) wrote them,
# copied from its output for this very setup.
TOP = {"schema_version", "settings", "environment", "models", "data", "preference", "reward_model_accuracy",
       "generation", "comparisons", "timing"}
SETTINGS = {"baseline", "batch_size", "cache", "cache_dir", "columns", "device", "do_sample", "dtype",
            "harmful_prompts", "instruction", "limit", "max_new_tokens", "max_prompt_tokens", "max_reply_tokens",
            "model", "out", "pairs", "progress", "prompts", "reference", "resamples", "reward_model", "seed",
            "skip_invalid", "steer", "steer_layers", "steer_strength", "temperature", "top_p"}
ENVIRONMENT = {"cpu_threads", "created", "device", "platform", "python", "versions"}
MODEL = {"base", "fingerprint", "path", "spec"}
DATA = {"format", "invalid", "kind", "n", "path", "sha256", "source"}
PREFERENCE = {"accuracy", "accuracy_summed", "implicit_accuracy", "margin", "mean_token_margin", "model", "n",
              "pair_margins", "source"}
RM_ACCURACY = {"accuracy", "longer_wins_accuracy", "mean_margin", "n", "source"}
GENERATION = {"behaviour", "lengths_chars", "mean_reward", "model", "n_items", "n_replies", "rewards", "source"}
BEHAVIOUR = {"n", "mean_tokens", "mean_words", "hit_limit_rate", "repetition_rate", "empty_rate", "offensive_rate",
             "refusal_rate", "n_harmful", "over_refusal_rate", "n_benign"}
COMPARISON = {"baseline_mean_score", "length_controlled_win_rate", "losses", "mean_score", "source", "ties",
              "win_rate", "wins"}
ESTIMATE = {"value", "low", "high", "n"}
TIMING = {"generation", "load_models", "preference", "total"}


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One evaluation with every stage: model, baseline, reference, reward model, pairs, prompts."""
    root = tmp_path_factory.mktemp("schema")
    model, baseline = save_tiny(root / "model"), save_tiny(root / "baseline", seed=1)
    save_tiny(root / "lm")
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(root / "lm", num_labels=1).save_pretrained(root / "rm")
    tiny_tokenizer().save_pretrained(root / "rm")
    pairs = jsonl(root / "pairs.jsonl", [
        {"prompt": "How do I boil an egg?", "chosen": "Nine minutes in boiling water.", "rejected": "No."},
        {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away."},
        {"prompt": "Broken", "chosen": "", "rejected": "x"},
        {"prompt": "Name a fox.", "chosen": "The quick brown fox.", "rejected": "A dog."},
    ])
    prompts = jsonl(root / "prompts.jsonl", [
        {"prompt": "Tell me about the fox."},
        {"question_id": 7, "turns": ["What is 2+2?", "And 3+3?"]},
        {"prompt": "How do I hurt someone?", "harmful": True},
    ])
    harmful = jsonl(root / "harmful.jsonl", [{"prompt": "Do a bad thing."}])
    config = EvalConfig(model=str(model), baseline=str(baseline), reference=str(baseline), pairs=[str(pairs)],
                        prompts=[str(prompts)], harmful_prompts=[str(harmful)], reward_model=str(root / "rm"),
                        max_new_tokens=4, resamples=RESAMPLES, cache_dir=str(root / "cache"), out=str(root / "out"),
                        progress=False, dtype="float32")
    report = run_eval(config)
    write_report(config.out, report, plots=False)
    return config, report


def test_run_eval_returns_a_typed_report_that_is_report_json(evaluated):
    config, report = evaluated
    assert isinstance(report, EvalReport)
    assert all(isinstance(e, PreferenceEntry) and isinstance(e.accuracy, Estimate) for e in report.preference)
    assert all(isinstance(e, GenerationEntry) for e in report.generation)
    written = json.loads((Path(config.out) / "report.json").read_text())
    assert written == report.to_dict()
    assert read_report(config.out) == report  # from_dict gives back the same typed report
    assert EvalReport.from_dict(written).to_dict() == written


def test_report_json_has_the_dict_built_keys(evaluated):
    _, report = evaluated
    d = report.to_dict()
    assert set(d) == TOP and d["schema_version"] == 1
    assert set(d["settings"]) == SETTINGS and set(d["environment"]) == ENVIRONMENT and set(d["timing"]) == TIMING
    assert {role: set(m) for role, m in d["models"].items()} == {
        role: MODEL for role in ("model", "baseline", "reference", "reward_model")}
    assert [e["kind"] for e in d["data"]] == ["pairs", "prompts", "harmful prompts"]
    assert all(set(e) == DATA for e in d["data"])
    # the model's entry carries the paired change against the baseline; the baseline's does not
    assert [(e["model"], set(e)) for e in d["preference"]] == [
        ("model", PREFERENCE | {"margin_vs_baseline"}), ("baseline", PREFERENCE)]
    assert [set(e) for e in d["reward_model_accuracy"]] == [RM_ACCURACY]
    assert [(e["source"].split("/")[-1], e["model"]) for e in d["generation"]] == [
        ("prompts.jsonl", "model"), ("prompts.jsonl", "baseline"), ("harmful.jsonl", "model"),
        ("harmful.jsonl", "baseline")]
    assert all(set(e) == GENERATION and set(e["behaviour"]) == BEHAVIOUR for e in d["generation"])
    assert [set(e) for e in d["comparisons"]] == [COMPARISON, COMPARISON]
    estimates = [e[k] for e in d["preference"] for k in ("accuracy", "accuracy_summed", "implicit_accuracy",
                                                          "margin", "mean_token_margin")]
    estimates += [e[k] for e in d["comparisons"] for k in ("win_rate", "length_controlled_win_rate")]
    assert all(set(e) == ESTIMATE for e in estimates)


def test_report_numbers_are_the_stage_functions_numbers(evaluated):
    """Each entry equals what the dict-building code put there, rebuilt from the same functions."""
    config, report = evaluated
    d = report.to_dict()
    boot = {"resamples": RESAMPLES, "seed": 0}
    pairs = load_preferences(config.pairs[0], skip_invalid=True).pairs
    source = d["data"][0]["source"]
    assert d["data"][0]["n"] == len(pairs) == 3 and d["data"][0]["invalid"] == {"empty_reply": 1}

    reference = load_for_eval(config.reference, dtype="float32")
    reference_scores = score_pairs(reference[0], reference[1], pairs, progress=False)
    margins = {}
    for entry, spec in zip(d["preference"], (config.model, config.baseline), strict=True):
        net, tokenizer, _ = load_for_eval(spec, dtype="float32")
        result = preference_accuracy(net, tokenizer, pairs, reference_scores=reference_scores, progress=False, **boot)
        margins[entry["model"]] = result.pair_margins
        expected = {"source": source, "model": entry["model"], **result.to_dict()}
        assert {k: v for k, v in entry.items() if k != "margin_vs_baseline"} == expected
    assert d["preference"][0]["margin_vs_baseline"] == bootstrap(margins["model"] - margins["baseline"], **boot).to_dict()

    rm = load_reward_model(config.reward_model, device="cpu")
    assert d["reward_model_accuracy"] == [{"source": source, **pairwise_accuracy(rm, pairs, progress=False, **boot)}]

    records = [json.loads(line) for line in (Path(config.out) / "generations.jsonl").read_text().splitlines()]
    for entry in d["generation"]:
        mine = [r for r in records if (r["source"], r["model"]) == (entry["source"], entry["model"])]
        replies = [r["reply"] for r in mine]
        assert entry["n_replies"] == len(mine) and entry["lengths_chars"] == [len(t) for t in replies]
        assert entry["behaviour"] == behaviour_stats(replies, tokens=[r["tokens"] for r in mine],
                                                     hit_limit=[r["hit_limit"] for r in mine],
                                                     harmful=[r["harmful"] for r in mine]).to_dict()
        assert entry["rewards"] == [r["reward"] for r in mine]
        assert entry["mean_reward"] == bootstrap(np.asarray(entry["rewards"]), **boot).to_dict()
    for k, comparison in enumerate(d["comparisons"]):
        a, b = d["generation"][2 * k], d["generation"][2 * k + 1]
        expected = compare(np.asarray(a["rewards"]), np.asarray(b["rewards"]), a["lengths_chars"],
                           b["lengths_chars"], **boot)
        assert comparison == {"source": a["source"], **expected.to_dict()}


def test_reports_without_the_newer_fields_read_back_unchanged():
    older = small_report()  # no pair_margins / mean_token_margin / margin_vs_baseline / steer / plots
    report = EvalReport.from_dict(older)
    assert report.preference[0].mean_token_margin is None and report.models["model"].steer is None
    assert report.to_dict() == older
    assert to_markdown(report) == to_markdown(older)
    assert "60.0 [50.0, 70.0]" in to_markdown(report)
