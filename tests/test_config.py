"""Config loading: YAML, overrides, validation messages, shipped example configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from rahf.config import ConfigError, check_against_model, default_target_layers, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_nested_overrides_keep_stage_defaults():
    config = load_config(None, ["fit.train.max_steps=3", "method=scit"])
    assert config.fit.train.max_steps == 3
    assert config.fit.train.learning_rate == 3e-4  # the fit stage's default, not the class default
    assert config.step1.train.epochs == 2.0
    assert config.reply_window == 512 and config.pattern_reply == "random"
    assert load_config(None, ["method=dual"]).pattern_reply == "both"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("fit.lerning_rate=1", "unknown config key 'fit.lerning_rate'"),
        ("patterns.alpha=.nan", "patterns.alpha must be a finite number"),
        ("patterns.alpha=-1", "patterns.alpha must be >= 0"),
        ("step1.lora.r=0", r"step1.lora.r \(LoRA rank\) must be an integer >= 1"),
        ("fit.train.max_steps=0", "fit.train.max_steps must be >= 1"),
        ("method=ppo", "method must be one of scit, dual"),
        ("fit.targets=sometimes", "fit.targets must be one of on-the-fly, cached"),
        ("fit.train.batch_size=abc", "fit.train.batch_size must be an integer"),
        ("step1.label_smoothing=0.7", r"step1.label_smoothing must be in \[0, 0.5\)"),
        ("max_pairs=0", "max_pairs must be >= 1"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean 'fit.kl_weight'"):
        load_config(None, ["fit.kl_wieght=1"])


def test_yaml_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("fit:\n  train: {learning_rate: -1}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: fit.train.learning_rate must be a positive number"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_target_layers_checked_against_depth():
    assert default_target_layers(32) == [10, 12, 14, 16, 18, 20]  # the paper's layers for 7B Llama
    assert check_against_model(load_config(None, []), 30) == default_target_layers(30)
    with pytest.raises(ConfigError, match=r"\[31\] out of range .* 1\.\.30"):
        check_against_model(load_config(None, ["patterns.target_layers=[10,31]"]), 30)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    config = load_config(path)
    assert config.method in ("scit", "dual")


def test_readme_config_reference_is_current():
    """README's config reference is `rahf config --markdown` (refresh: scripts/update_readme.py)."""
    import contextlib
    import io

    from rahf.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["config", "--markdown"]) == 0
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("<!-- config-reference:start -->\n")[1].split("<!-- config-reference:end -->")[0]
    assert section == out.getvalue()


def test_bare_no_is_the_option_not_false():
    """YAML 1.1 reads `no` as false; for options that include "no" it means the option."""
    assert load_config(None, ["mixed_precision=no"]).mixed_precision == "no"
    with pytest.raises(ConfigError, match="mixed_precision must be one of"):
        load_config(None, ["mixed_precision=yes"])
