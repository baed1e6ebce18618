"""Config loading: YAML, overrides, validation messages, shipped example configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from rahf.config import (
    BaselineConfig,
    ConfigError,
    check_against_model,
    default_target_layers,
    load_config,
)

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


@pytest.mark.parametrize(("marker", "argv"), [("config-reference", ["config", "--markdown"]),
                                             ("baseline-config-reference", ["config", "baseline", "--markdown"])])
def test_readme_config_reference_is_current(marker, argv):
    """README's config references are `rahf config [baseline] --markdown` (refresh: scripts/update_readme.py)."""
    import contextlib
    import io

    from rahf.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split(f"<!-- {marker}:start -->\n")[1].split(f"<!-- {marker}:end -->")[0]
    assert section == out.getvalue()


def test_bare_no_is_the_option_not_false():
    """YAML 1.1 reads `no` as false; for options that include "no" it means the option."""
    assert load_config(None, ["mixed_precision=no"]).mixed_precision == "no"
    with pytest.raises(ConfigError, match="mixed_precision must be one of"):
        load_config(None, ["mixed_precision=yes"])


# ---------------------------------------------------------------- one loader: layers and messages


def align_args(*argv):
    from rahf.cli import build_parser

    return build_parser().parse_args(["align", *argv])


def test_precedence_defaults_file_set_flags(tmp_path):
    """defaults <- --config files (later wins) <- --set <- flags, key by key; sections merge."""
    from rahf.commands import align_config

    first = tmp_path / "first.yaml"
    first.write_text("seed: 1\npatterns: {alpha: 1}\nfit: {kl_weight: 0.1, train: {max_steps: 9}}\nmax_pairs: 40\n")
    second = tmp_path / "second.yaml"
    second.write_text("max_pairs: 50\nfit: {train: {batch_size: 2}}\n")
    config = align_config(align_args("--config", str(first), "--config", str(second),
                                     "--set", "patterns.alpha=2", "--set", "seed=2", "--alpha", "3"))
    assert config.patterns.alpha == 3.0  # the flag beats --set and the file
    assert config.seed == 2  # --set beats the file
    assert config.max_pairs == 50  # the later file beats the earlier one
    assert (config.fit.kl_weight, config.fit.train.max_steps, config.fit.train.batch_size) == (0.1, 9, 2)
    assert config.fit.train.learning_rate == 3e-4  # untouched: the fit stage's own default


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "fit.kl_wieght=1"], r"^--set fit.kl_wieght=1: unknown config key 'fit.kl_wieght' \(did you mean 'fit.kl_weight'\?\)$"),
        (["--seed", "abc"], r"^--seed: seed must be an integer, got 'abc'$"),
        (["--set", "fit.train.batch_size=1.5"], r"^--set fit.train.batch_size=1.5: fit.train.batch_size must be an integer, got 1.5$"),
        (["--alpha", "-1"], r"^--alpha: patterns.alpha must be >= 0"),
        (["--max-steps", "0"], r"^--max-steps: step1.train.max_steps must be >= 1"),
        (["--set", "baseline.beta=0.2"], r"^--set baseline.beta=0.2: baseline.beta belongs to `rahf baseline` \(there the key is `beta`\)"),
    ],
)
def test_flag_and_set_errors_name_key_value_and_source(argv, message):
    from rahf.commands import align_config

    with pytest.raises(ConfigError, match=message) as err:
        align_config(align_args(*argv))
    assert "\n" not in str(err.value)


def test_file_errors_name_the_file_and_the_key(tmp_path):
    from rahf.commands import align_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: abc\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: seed must be an integer, got 'abc'$"):
        align_config(align_args("--config", str(bad)))
    bad.write_text("patterns: {alpah: 1}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'patterns.alpah' \(did you mean 'patterns.alpha'\?\)"):
        align_config(align_args("--config", str(bad)))
    with pytest.raises(ConfigError, match=r"config file nowhere.yaml does not exist \(packaged recipes: demo-dual,"):
        align_config(align_args("--config", "nowhere.yaml"))


# ---------------------------------------------------------------- baseline settings are not align settings


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--alpha", "3"], "--alpha: patterns.alpha belongs to `rahf align`, not `rahf baseline`"),
        (["--set", "patterns.alpha=3"], "--set patterns.alpha=3: patterns.alpha belongs to `rahf align`, not `rahf baseline`"),
        (["--target-layers", "2,4"], "--target-layers: patterns.target_layers belongs to `rahf align`, not `rahf baseline`"),
        (["--set", "step1.train.learning_rate=1e-4"],
         "--set step1.train.learning_rate=1e-4: step1.train.learning_rate belongs to `rahf align`, not `rahf baseline`"),
        (["--method", "scit"], "--method: method must be one of sft, dpo; got 'scit'"),
    ],
)
def test_baseline_refuses_align_keys_in_one_line(argv, message, capsys):
    from rahf.cli import main

    assert main(["baseline", "sft", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rahf: error: {message}")
    assert err.count("\n") == 1  # one line


def test_baseline_config_has_its_own_keys(tmp_path):
    from rahf.baselines.commands import baseline_config
    from rahf.cli import build_parser
    from rahf.config import BaselineConfig

    recipe = tmp_path / "dpo.yaml"
    recipe.write_text("beta: 0.3\ntrain: {learning_rate: 1.0e-4}\nlora: {r: 4}\nmax_reply_tokens: 32\n")
    args = build_parser().parse_args(["baseline", "dpo", "--config", str(recipe), "--max-steps", "5",
                                      "--set", "precompute_ref_log_probs=false"])
    config = baseline_config(args)
    assert isinstance(config, BaselineConfig)
    assert (config.method, config.run_dir, config.beta, config.precompute_ref_log_probs) == ("dpo", "runs/dpo", 0.3, False)
    assert (config.train.learning_rate, config.train.max_steps, config.train.epochs) == (1e-4, 5, 1.0)
    assert (config.lora.r, config.lora.alpha, config.reply_window) == (4, 32, 32)
    assert not hasattr(config, "patterns") and not hasattr(config, "step1")
    assert BaselineConfig().reply_window == 64  # what baselines used before (align's Dual default)


def test_old_baseline_section_keys_still_read(tmp_path):
    """`baseline.X` (when the baseline's settings lived inside align's config) is `X` now."""
    from rahf.baselines.commands import baseline_config
    from rahf.cli import build_parser

    old = tmp_path / "old.yaml"
    old.write_text("baseline:\n  beta: 0.3\n  train: {learning_rate: 1.0e-4, max_steps: 9}\n")
    args = build_parser().parse_args(["baseline", "dpo", "--config", str(old), "--set", "baseline.full_finetune=true",
                                      "--set", "train.max_steps=4"])
    config = baseline_config(args)
    assert (config.beta, config.full_finetune, config.train.learning_rate) == (0.3, True, 1e-4)
    assert config.train.max_steps == 4  # the later layer wins, whichever name it uses
    assert "baseline" not in config.to_dict()  # config.yaml shows the new keys
    with pytest.raises(ConfigError, match=r"^--set baseline.train.lerning_rate=1: unknown config key 'train.lerning_rate' \(did you mean 'train.learning_rate'\?\)"):
        load_config(None, ["baseline.train.lerning_rate=1"], cls=BaselineConfig)


def test_saved_configs_of_older_runs_still_compare_equal(tmp_path):
    """config.json of folders written when BaselineConfig lived inside AlignConfig."""
    import dataclasses
    import json

    from rahf.config import AlignConfig, BaselineConfig
    from rahf.runs import RunDir

    align = AlignConfig(run_dir=str(tmp_path / "a"))
    old_baseline_section = dataclasses.asdict(BaselineConfig())
    old_baseline_section = {k: old_baseline_section[k] for k in ("train", "lora", "full_finetune", "beta", "precompute_ref_log_probs")}
    old_align = align.to_dict() | {"baseline": old_baseline_section}
    assert align.upgrade_saved(old_align) == align.to_dict()

    baseline = BaselineConfig(method="dpo", beta=0.2)
    old_run = {k: v for k, v in old_align.items() if k != "baseline"} | {"baseline": old_baseline_section | {"beta": 0.2}}
    upgraded = baseline.upgrade_saved(old_run)
    assert upgraded.pop("run_dir") == str(tmp_path / "a")  # cosmetic: not compared on resume
    assert upgraded == {k: v for k, v in baseline.to_dict().items() if k != "run_dir"}

    run = RunDir(tmp_path / "b")
    run.root.mkdir()
    (run.root / "config.json").write_text(json.dumps({k: v for k, v in old_run.items() if k not in ("run_dir", "report_to", "logging_steps", "device")}))
    run.check_config(dataclasses.replace(baseline, run_dir=str(run.root)), overwrite=False)  # resumes
    (run.root / "config.json").write_text(json.dumps({k: v for k, v in old_run.items() if k not in ("run_dir", "report_to", "logging_steps", "device")}))
    with pytest.raises(ConfigError, match="beta differ"):
        run.check_config(dataclasses.replace(baseline, run_dir=str(run.root), beta=0.5), overwrite=False)


# ---------------------------------------------------------------- packaged recipes


# The demo's settings as rahf demo spelled them before they became packaged recipes.
OLD_DEMO_COMMON = ["model=smollm2", "data=builtin", "validation_fraction=0.2", "max_prompt_tokens=128",
                   "max_reply_tokens=64", "logging_steps=5", "save_steps=25", "step1.train.batch_size=8",
                   "fit.train.batch_size=8"]
OLD_DEMO_BUDGET = {
    ("dual", False): ["step1.train.epochs=1", "step1.train.learning_rate=1e-3", "fit.train.epochs=1",
                      "fit.train.learning_rate=1e-3", "patterns.alpha=2.5"],
    ("dual", True): ["max_pairs=32", "step1.train.max_steps=4", "step1.train.learning_rate=1e-3",
                     "fit.train.max_steps=4", "fit.train.learning_rate=1e-3", "patterns.alpha=2.5"],
    ("scit", False): ["step1.train.epochs=1", "step1.train.learning_rate=5e-4", "fit.train.epochs=1",
                      "fit.train.learning_rate=1e-3", "patterns.alpha=2.5"],
    ("scit", True): ["max_pairs=32", "step1.train.max_steps=4", "step1.train.learning_rate=1e-3",
                     "fit.train.max_steps=6", "fit.train.learning_rate=1e-3", "patterns.alpha=2.5"],
}


@pytest.mark.parametrize(("method", "quick"), list(OLD_DEMO_BUDGET))
def test_demo_recipes_resolve_to_the_old_demo_settings(method, quick):
    from rahf.demo import demo_config, demo_overrides

    name = f"demo-{method}{'-quick' if quick else ''}"
    old = load_config(None, [f"method={method}", *OLD_DEMO_COMMON, *OLD_DEMO_BUDGET[(method, quick)], f"run_dir=runs/{name}"])
    assert demo_config(method, quick) == old
    assert load_config(None, [*demo_overrides(method, quick), f"run_dir=runs/{name}"]) == old  # bench/quality's path
    assert load_config(name, [f"run_dir=runs/{name}"]) == old  # --config accepts the recipe's name
    assert demo_config(method, quick, "elsewhere", ["patterns.alpha=4"]).patterns.alpha == 4.0


def test_recipes_are_packaged_and_checked():
    from rahf.recipes import load_recipe, names

    assert {"demo-dual", "demo-dual-quick", "demo-scit", "demo-scit-quick"} <= set(names())
    assert load_recipe("demo-scit")["method"] == "scit"
    with pytest.raises(ConfigError, match="no packaged recipe 'demo-ppo'; recipes: demo-dual"):
        load_recipe("demo-ppo")
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"recipes/*.yaml"' in pyproject  # shipped in the wheel, not only in the checkout


def test_saved_align_config_yaml_of_older_runs_loads(tmp_path):
    """`rahf scan --run` reads a run's config.yaml; older ones carry a `baseline` section."""
    import yaml

    from rahf.config import AlignConfig, load_saved_config

    config = AlignConfig(method="scit", seed=3)
    old = config.to_dict() | {"baseline": {"beta": 0.1, "train": {"learning_rate": 5e-4}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert load_saved_config(tmp_path / "config.yaml") == config
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config.to_dict() | {"seed": "x"}))
    with pytest.raises(ConfigError, match=r"config.yaml: seed must be an integer, got 'x'"):
        load_saved_config(tmp_path / "config.yaml")


def test_runs_saved_before_shared_length_resume_with_it_off():
    from rahf.config import AlignConfig, BaselineConfig

    align = AlignConfig(method="dual")
    saved = align.to_dict()
    del saved["step1"]["shared_length"]
    del saved["step1"]["loss_type"]  # step1.loss_type and sft_weight came later still
    del saved["step1"]["sft_weight"]
    del saved["fit"]["stop_weight"]  # fit.stop_weight came later still
    assert align.upgrade_saved(saved) == align.to_dict()
    baseline = BaselineConfig(method="dpo")
    saved = baseline.to_dict()
    del saved["shared_length"]
    del saved["loss_type"]
    del saved["sft_weight"]
    assert baseline.upgrade_saved(saved) == baseline.to_dict()
