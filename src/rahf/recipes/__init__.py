"""Recipes packaged with rahf: YAML config files that ``--config NAME`` accepts by name.

    rahf align --config demo-dual            # the settings `rahf demo` trains with
    from rahf.recipes import load_recipe     # the same settings as a dict

``demo-dual`` / ``demo-scit`` are `rahf demo`'s budgets; ``*-quick`` are ``rahf demo --quick``'s.
A recipe is read like any config file (rahf.config_loader), so it fails on unknown keys too.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import yaml

__all__ = ["demo_recipe", "load_recipe", "names"]


def names() -> list[str]:
    """The packaged recipe names (file names without ``.yaml``)."""
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


def load_recipe(name: str) -> dict[str, Any]:
    """The recipe's keys as a nested dict (unchecked: load it through a config class to check)."""
    from rahf.config_loader import ConfigError

    if name not in names():
        raise ConfigError(f"no packaged recipe {name!r}; recipes: {', '.join(names())}")
    data = yaml.safe_load(resources.files(__name__).joinpath(f"{name}.yaml").read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {name}: expected a mapping of config keys")
    return data


def demo_recipe(method: str, quick: bool) -> str:
    """The recipe name of ``rahf demo --method METHOD [--quick]``."""
    return f"demo-{method}{'-quick' if quick else ''}"
