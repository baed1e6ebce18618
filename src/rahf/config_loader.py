"""One loader for every command's config dataclass: defaults <- YAML files <- ``--set`` <- flags.

    config = load(AlignConfig, [("run.yaml", yaml_dict), ("--set", {"fit": {"kl_weight": 0.1}})])

A *layer* is ``(source, mapping)``: a YAML file, a packaged recipe, the ``--set key=value``
items or the named flags, applied in that order (a later layer wins key by key; nested sections
merge, other values replace). Every value is checked against the field's type as its layer is
read, so a type error names the key, the value and where it came from; unknown keys fail with the
closest known key, or, for keys that belong to another command (``FOREIGN_KEYS`` on the class),
with that command's name; old section names (``RENAMED_SECTIONS``) read as their new place.
Cross-field checks run once, in the dataclass's ``__post_init__``, on the merged result, and a
failure is prefixed with the layer that set the key it names.

Flags are :class:`Flag` objects that map one option to one or more dotted keys;
:func:`field_flags` makes one per field of a flat dataclass, with the field's ``help`` metadata,
its ``Literal`` choices and a ``--no-`` switch for booleans that default to true.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")
Layer = tuple[str, Mapping[str, Any]]


class ConfigError(ValueError):
    """Bad configuration; the message names the key."""


class _Section(dict):
    """A nested dataclass's keys inside a checked layer (merged key by key, not replaced)."""


# ---------------------------------------------------------------- checking and building


def _foreign(cls: type, path: str) -> str | None:
    """The one-line reason ``path`` belongs to another command, from ``cls.FOREIGN_KEYS``."""
    for prefix, reason in getattr(cls, "FOREIGN_KEYS", {}).items():
        if path == prefix or path.startswith(prefix + "."):
            rest = path[len(prefix) + 1:]
            return reason.format(key=path, rest=rest or prefix)
    return None


def _first_leaf(path: str, value: Any) -> str:
    """``a.b.c`` for ``path = "a"`` and ``value = {"b": {"c": 1}}``: the full key a message names."""
    while isinstance(value, Mapping) and value:
        key, value = next(iter(value.items()))
        path = f"{path}.{key}"
    return path


def _rename_sections(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """Old section names read as their new place (``cls.RENAMED_SECTIONS``: old -> new, "" for
    the top level), so config files and ``--set`` items written for an older rahf keep working;
    a key given under both names in one layer takes the new name's value."""
    data = dict(data)
    for old, new in getattr(cls, "RENAMED_SECTIONS", {}).items():
        if isinstance(data.get(old), Mapping):
            moved = data.pop(old)
            target = data if not new else data.setdefault(new, {})
            _merge_plain(target, moved)
    return data


def _merge_plain(into: dict, old: Mapping) -> None:
    for key, value in old.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), Mapping):
            into[key] = dict(into[key])
            _merge_plain(into[key], value)
        elif key not in into:
            into[key] = value


def check_layer(cls: type, data: Any, source: str, *, root: type | None = None, prefix: str = "") -> _Section:
    """``data`` with every key known to ``cls`` and every value converted to its field's type."""
    root = root or cls
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
    if not prefix:
        data = _rename_sections(cls, data)
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    out = _Section()
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            foreign = _foreign(root, _first_leaf(path, value))
            if foreign:
                raise ConfigError(f"{source}: {foreign}")
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: unknown config key '{path}'{hint}")
        hint_type = hints[key]
        if dataclasses.is_dataclass(hint_type):
            out[key] = check_layer(hint_type, value or {}, source, root=root, prefix=f"{path}.")
        else:
            try:
                out[key] = coerce(value, hint_type, path)
            except ConfigError as err:
                raise ConfigError(f"{source}: {err}") from None
    return out


def coerce(value: Any, hint: Any, path: str) -> Any:
    """``value`` as type ``hint`` (strings from flags and ``--set`` are parsed; YAML's typed values kept)."""
    origin = get_origin(hint)
    args = get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{path} may not be empty")
    if origin is Literal:
        if value is False:  # YAML 1.1 reads a bare `no` or `off` as false
            value = next((word for word in ("no", "off") if word in args), value)
        if value not in args:
            raise ConfigError(f"{path} must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return coerce(value, inner[0], path)
        return value  # e.g. str | dict: the dataclass checks it
    if origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [v.strip() for v in str(value).split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        return [coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path} must be a number, got {value!r}") from None
    if hint is int:
        if isinstance(value, bool) or isinstance(value, float):
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        try:
            return int(str(value))
        except ValueError:
            raise ConfigError(f"{path} must be an integer, got {value!r}") from None
    if hint is str:
        if isinstance(value, (Mapping, list)):
            raise ConfigError(f"{path} must be a text, got {value!r}")
        return str(value)
    return value


def _merge(into: dict, layer: Mapping) -> None:
    for key, value in layer.items():
        if isinstance(value, _Section) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = _Section(value) if isinstance(value, _Section) else value


def _origins(layer: Mapping, source: str, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in layer.items():
        if isinstance(value, _Section):
            out |= _origins(value, source, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = source
    return out


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def build(cls: type[T], data: Mapping[str, Any], default: Any = None) -> T:
    """``cls`` from checked values. Keys not given keep ``default``'s values, or the field's
    default: a nested section like ``fit.train`` keeps its own stage defaults (the field's
    factory), not the section class's defaults."""
    fields = [f for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for f in fields:
        value = getattr(default, f.name) if default is not None else _field_default(f)
        if value is not dataclasses.MISSING:
            kwargs[f.name] = value
    hints = get_type_hints(cls)
    for key, value in data.items():
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = build(hints[key], value, kwargs.get(key))
        else:
            kwargs[key] = value
    missing = [f.name for f in fields if f.name not in kwargs]
    if missing:
        raise ConfigError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required")
    return cls(**kwargs)


def load(cls: type[T], layers: Iterable[Layer]) -> T:
    """``cls`` built from defaults and ``layers`` (each ``(source, mapping)``; later layers win).

    A check in ``__post_init__`` that fails names its key; the message is prefixed with the
    layer that set that key (the file or the flag), so the user knows what to change.
    """
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for source, data in layers:
        checked = check_layer(cls, data, source)
        _merge(merged, checked)
        origins |= _origins(checked, source)
    try:
        return build(cls, merged)
    except ConfigError as err:
        message = str(err)
        key = _key_named(message, origins)
        if key is None:
            raise ConfigError(message) from None
        raise ConfigError(f"{origins[key]}: {message}") from None


def _key_named(message: str, origins: dict[str, str]) -> str | None:
    """The longest key the message names that a layer set (None when only defaults are involved)."""
    named = [k for k in origins if re.search(rf"(?<![\w.]){re.escape(k)}(?![\w])", message)]
    return max(named, key=len) if named else None


# ---------------------------------------------------------------- sources: files, --set, flags


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file; the error names the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys")
    return data


def file_layer(name: str | Path) -> Layer:
    """``--config NAME``: a YAML file, or else a recipe packaged with rahf (``rahf.recipes``)."""
    from rahf import recipes

    if not Path(name).is_file() and str(name) in recipes.names():
        return f"recipe {name}", recipes.load_recipe(str(name))
    if not Path(name).is_file():
        raise ConfigError(f"config file {name} does not exist (packaged recipes: {', '.join(recipes.names())})")
    return str(name), read_yaml(name)


def nest(key: str, value: Any, into: dict | None = None) -> dict[str, Any]:
    """``{"a": {"b": value}}`` for ``key = "a.b"`` (into an existing mapping when given)."""
    into = {} if into is None else into
    node = into
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: '{part}' is not a section")
    node[parts[-1]] = value
    return into


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``key.sub=value`` strings, values read as YAML (``[1,2]``, ``true``, ``1e-3``)."""
    data: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        nest(key, value, data)
    return data


def set_layers(items: Sequence[str]) -> list[Layer]:
    """One layer per ``--set`` item, so an error names the item."""
    return [(f"--set {item}", parse_set([item])) for item in items]


@dataclass(frozen=True)
class Flag:
    """A command-line option that sets config keys.

    ``switch``: the option takes no value and sets the keys to ``value`` (``--no-cache`` sets
    ``cache`` to false). ``repeat``: the option may be given several times; the values form a
    list. ``hidden``: not shown in ``--help``: options of another command, accepted only to fail
    with a message that names it.
    """

    option: str
    keys: tuple[str, ...]
    help: str | None = None
    switch: bool = False
    value: Any = True
    repeat: bool = False
    metavar: str | None = None
    hidden: bool = False
    group: str | None = None  # flags of one group exclude each other
    choices: tuple[Any, ...] | None = None  # default: a Literal field's values

    @property
    def dest(self) -> str:
        return self.option.lstrip("-").replace("-", "_")


def flag(option: str, *keys: str, **kwargs: Any) -> Flag:
    return Flag(option, keys or (option.lstrip("-").replace("-", "_"),), **kwargs)


def _field_of(cls: type, key: str) -> tuple[dataclasses.Field, Any]:
    for part in key.split(".")[:-1]:
        cls = get_type_hints(cls)[part]
    name = key.split(".")[-1]
    return next(f for f in dataclasses.fields(cls) if f.name == name), get_type_hints(cls)[name]


def field_flags(
    cls: type, *, skip: Iterable[str] = (), options: Mapping[str, str] | None = None,
    metavars: Mapping[str, str] | None = None, helps: Mapping[str, str] | None = None,
) -> list[Flag]:
    """One flag per top-level, non-section field of ``cls``: ``--field-name``; a boolean
    defaulting to true becomes ``--no-field-name``; lists become repeatable. ``options``
    renames a field's option (``{"do_sample": "--sample"}``); ``helps`` replaces a field's help
    (a ``--no-`` switch needs one that says what turning it off does)."""
    options, metavars, helps = dict(options or {}), dict(metavars or {}), dict(helps or {})
    flags = []
    for f in dataclasses.fields(cls):
        hint = get_type_hints(cls)[f.name]
        if f.name in skip or dataclasses.is_dataclass(hint) or not f.init:
            continue
        if hint is bool:
            on = f.default is True
            option = options.get(f.name, f"--{'no-' if on else ''}{f.name.replace('_', '-')}")
            flags.append(Flag(option, (f.name,), switch=True, value=not on, help=helps.get(f.name)))
        else:
            option = options.get(f.name, f"--{f.name.replace('_', '-')}")
            flags.append(Flag(option, (f.name,), repeat=get_origin(hint) is list, metavar=metavars.get(f.name),
                              help=helps.get(f.name)))
    return flags


def add_flags(parser: argparse.ArgumentParser, cls: type | None, flags: Sequence[Flag]) -> None:
    """Add ``flags`` to ``parser``: help and choices from the first key's field of ``cls``
    (``cls=None``: the flags carry their own, so a heavy module need not load for ``--help``)."""
    groups: dict[str, Any] = {}
    for item in flags:
        target = parser
        if item.group:
            if item.group not in groups:
                groups[item.group] = parser.add_mutually_exclusive_group()
            target = groups[item.group]
        kwargs: dict[str, Any] = {"dest": item.dest}
        help_text, choices = item.help, item.choices
        if not item.hidden and cls is not None:
            field_, hint = _field_of(cls, item.keys[0])
            help_text = help_text or field_.metadata.get("help") or field_.name.replace("_", " ")
            if choices is None and get_origin(hint) is Literal:
                choices = get_args(hint)
        if choices and not item.switch:
            kwargs["choices"] = choices
        kwargs["help"] = argparse.SUPPRESS if item.hidden else help_text
        if item.switch:
            target.add_argument(item.option, action="store_true", default=None, **kwargs)
        else:
            target.add_argument(item.option, action="append" if item.repeat else "store",
                                metavar=item.metavar, **kwargs)
    parser.set_defaults(config_flags=(*(parser.get_default("config_flags") or ()), *flags))


def add_config_options(
    parser: argparse.ArgumentParser, *, what: str = "flags and --set override it",
    example: str = "fit.train.learning_rate=1e-4",
) -> None:
    """``--config FILE|RECIPE`` (repeatable) and ``--set KEY=VALUE`` (repeatable)."""
    parser.add_argument("--config", dest="config_files", action="append", default=[], metavar="FILE|RECIPE",
                        help=f"YAML config file or packaged recipe name (repeatable, later wins); {what}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"set any config key, e.g. --set {example} (repeatable)")


def flag_layers(args: argparse.Namespace) -> list[Layer]:
    """One layer per flag given on the command line."""
    layers = []
    for item in getattr(args, "config_flags", ()):
        value = getattr(args, item.dest, None)
        if value is None or (item.switch and value is False):
            continue
        value = item.value if item.switch else value
        data: dict[str, Any] = {}
        for key in item.keys:
            nest(key, value, data)
        layers.append((item.option, data))
    return layers


def layers_from_args(args: argparse.Namespace, *, first: Sequence[Layer] = ()) -> list[Layer]:
    """``first`` (e.g. a recipe) <- ``--config`` files <- ``--set`` items <- flags."""
    layers = list(first)
    layers += [file_layer(name) for name in getattr(args, "config_files", None) or []]
    layers += set_layers(getattr(args, "overrides", None) or [])
    return layers + flag_layers(args)


def given(layers: Sequence[Layer], key: str) -> bool:
    """Whether any layer sets the top-level ``key``."""
    return any(key in data for _, data in layers)


# ---------------------------------------------------------------- the reference


def describe(obj: Any) -> list[tuple[str, Any, str]]:
    """(key, default, help) for every field of a dataclass (class or instance), nested keys
    dotted; a required field's default is ``dataclasses.MISSING``."""
    rows = []
    for f in dataclasses.fields(obj):
        value = _field_default(f) if isinstance(obj, type) else getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            rows += [(f"{f.name}.{k}", v, h) for k, v, h in describe(value)]
        else:
            rows.append((f.name, value, f.metadata.get("help", "")))
    return rows
