"""Hub-ready output: the model card's metadata (read back with the Hub's own parser) and
``--push-to-hub`` (HfApi patched: no network)."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import ModelCard, metadata_load

from rahf.config import load_config
from rahf.export import hub_files, model_card, push_to_hub
from rahf.testing import save_tiny, write_toy_pairs

LOGS = {
    "step1_preferred": [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.25}],
    "fit": [{"step": 1, "loss": 0.5}, {"step": 4, "loss": 0.125}],
}
STATS = {"train": 10, "validation": 2, "format": "plain"}


def card(config, **kwargs) -> ModelCard:
    text = model_card(
        config, title="RAHF-DUAL adapter", summary="s.", settings="t.", base="/somewhere/base",
        data_stats=STATS, logs=LOGS, tags=("alignment",), **kwargs,
    )
    return ModelCard(text)


def test_card_metadata_for_a_hub_model_and_dataset():
    config = load_config(None, ["model=smollm2", "data=Anthropic/hh-rlhf"])
    data = card(config, results={"fit_reached": 0.75}).data
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the embedded model's origin
    assert data.library_name == "peft"
    assert data.license == "apache-2.0"  # SmolLM2's license
    assert data.datasets == ["Anthropic/hh-rlhf"]
    assert {"rahf", "alignment"} <= set(data.tags)
    measured = {r.metric_name: r.metric_value for r in data.eval_results}
    assert measured == {
        "step1_preferred final train loss": 2.25, "fit final train loss": 0.125, "fit_reached": 0.75,
    }
    assert {r.dataset_type for r in data.eval_results} == {"Anthropic/hh-rlhf"}
    assert data.model_name == "RAHF-DUAL adapter"


def test_card_for_local_model_and_data_names_no_paths(tmp_path):
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "pairs.jsonl"
    data.write_text("")
    meta = card(load_config(None, [f"model={model}", f"data={data}"])).data.to_dict()
    assert "base_model" not in meta and "datasets" not in meta
    assert meta["license"] == "other" and meta["license_name"] == "base-model-license"
    assert str(tmp_path) not in json.dumps(meta)  # local paths never reach the metadata
    # A local model whose README states a license passes it on.
    (model / "README.md").write_text("---\nlicense: mit\n---\n# my model\n")
    assert card(load_config(None, [f"model={model}", f"data={data}"])).data.license == "mit"


def test_card_file_parses_with_metadata_load(tmp_path):
    path = tmp_path / "README.md"
    path.write_text(str(card(load_config(None, ["model=smollm2", "data=builtin"]))))
    meta = metadata_load(path)
    assert meta["library_name"] == "peft" and meta["license"] == "apache-2.0"
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 2.25


def test_full_finetune_baseline_card_is_a_transformers_model():
    from rahf.baselines import baseline_card
    from rahf.config import BaselineConfig

    config = load_config(None, ["method=dpo", "model=smollm2", "data=builtin", "full_finetune=true"], cls=BaselineConfig)
    data = ModelCard(baseline_card(config, "dpo", base="/x", data_stats=STATS, logs={"dpo": LOGS["fit"]})).data
    assert data.library_name == "transformers"
    assert {"baseline", "dpo", "trl"} <= set(data.tags)
    assert [r.metric_value for r in data.eval_results] == [0.125]


def test_dpo_baseline_card_names_its_loss():
    from rahf.baselines import baseline_card
    from rahf.config import BaselineConfig

    plain = load_config(None, ["method=dpo", "model=smollm2", "data=builtin"], cls=BaselineConfig)
    assert "DPO (sigmoid loss, beta 0.1), reference" in baseline_card(plain, "dpo", base="/x", data_stats=STATS, logs={})
    rpo = load_config(None, ["method=dpo", "model=smollm2", "data=builtin", "loss_type=sigmoid_norm", "beta=5",
                             "sft_weight=0.5"], cls=BaselineConfig)
    text = baseline_card(rpo, "dpo", base="/x", data_stats=STATS, logs={})
    assert "DPO (sigmoid_norm loss, beta 5.0, plus 0.5 x the chosen reply's NLL), reference" in text


class FakeApi:
    """Records what ``push_to_hub`` would send; ``fail`` makes the commit raise like the Hub does."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.repos: list[tuple[str, dict]] = []
        self.commits: list[tuple[str, dict[str, str]]] = []
        self.fail = fail

    def create_repo(self, repo_id, **kwargs):
        self.repos.append((repo_id, kwargs))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        if self.fail:
            raise self.fail
        self.commits.append((repo_id, {op.path_in_repo: op.path_or_fileobj for op in operations}))


@pytest.fixture()
def patched_api(monkeypatch):
    api = FakeApi()
    for name in ("create_repo", "create_commit"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, lambda self, *a, _n=name, **k: getattr(api, _n)(*a, **k))
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    return api


def fake_final(root: Path) -> Path:
    final = root / "final"
    for rel in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "merged/config.json",
                "merged/model.safetensors", "merged/tokenizer.json", "README.md", "config.yaml", "metrics.jsonl", "loss.png"):
        (final / rel).parent.mkdir(parents=True, exist_ok=True)
        (final / rel).write_text(rel)
    return final


def test_push_uploads_adapter_at_root_and_merged_in_subfolder(tmp_path, patched_api):
    final = fake_final(tmp_path)
    url = push_to_hub(final, "me/rahf-test", private=True)
    assert url == "https://huggingface.co/me/rahf-test"
    assert patched_api.repos == [("me/rahf-test", {"private": True, "exist_ok": True, "repo_type": "model"})]
    [(repo, files)] = patched_api.commits
    assert repo == "me/rahf-test"
    assert set(files) == {
        "adapter_config.json", "adapter_model.safetensors", "merged/config.json", "merged/model.safetensors",
        "merged/tokenizer.json", "README.md", "config.yaml", "metrics.jsonl", "loss.png",
    }
    for path_in_repo, local in files.items():  # each file comes from its own place in final/
        assert Path(local).read_text() in (path_in_repo, f"adapter/{path_in_repo}")


def test_push_failure_is_one_line_and_keeps_the_run(tmp_path):
    from rahf.export import PushError

    final = fake_final(tmp_path)
    api = FakeApi(fail=ConnectionError("[Errno 111] Connection\nrefused"))  # HfHubHTTPError is an OSError too
    with pytest.raises(PushError, match=r"me/x failed: \[Errno 111\] Connection refused; .*rerun the same command"):
        push_to_hub(final, "me/x", api=api)
    assert (final / "merged" / "model.safetensors").is_file()


def test_push_refuses_a_folder_without_a_card(tmp_path, patched_api):
    final = fake_final(tmp_path)
    (final / "README.md").unlink()
    with pytest.raises(FileNotFoundError, match="no README.md"):
        push_to_hub(final, "me/x")
    assert patched_api.repos == []


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    return save_tiny(root / "tiny", layers=3), write_toy_pairs(root / "pairs.jsonl", 12)


def align_argv(model, data, run_dir) -> list[str]:
    return [
        "--quiet", "align", "--model", str(model), "--data", str(data), "--run-dir", str(run_dir),
        "--max-steps", "2", "--target-layers", "1,2", "--device", "cpu",
        "--set", "logging_steps=1", "--set", "max_reply_tokens=8", "--set", "validation_fraction=0.2",
    ]


def test_cli_align_push_to_hub(tiny, tmp_path, patched_api):
    from rahf.cli import main

    run_dir = tmp_path / "run"
    assert main([*align_argv(*tiny, run_dir), "--push-to-hub", "me/tiny-rahf", "--hub-private"]) == 0
    [(repo, files)] = patched_api.commits
    assert repo == "me/tiny-rahf" and patched_api.repos[0][1]["private"] is True
    final = run_dir / "final"
    assert dict(files) == {path: str(local) for local, path in hub_files(final)}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "merged/config.json"} <= set(files)
    assert not any(p.startswith("merged/adapter") for p in files)  # never adapter + merged in one folder
    # The uploaded card is the run's card, and the Hub parser reads it.
    assert ModelCard.load(files["README.md"]).data.library_name == "peft"


def test_cli_push_without_token_fails_before_training(tiny, tmp_path, monkeypatch, capsys):
    from rahf.cli import main

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    run_dir = tmp_path / "run"
    assert main([*align_argv(*tiny, run_dir), "--push-to-hub", "me/x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no Hugging Face token" in err[0] and "HF_TOKEN" in err[0]
    assert not run_dir.exists()
    assert main([*align_argv(*tiny, run_dir), "--push-to-hub", "not a repo"]) == 2
