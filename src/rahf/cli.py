"""The ``rahf`` command: a thin dispatcher over per-feature command modules.

Each module in ``COMMAND_MODULES`` has ``register(subparsers)`` which adds its sub-commands and
sets ``func`` on them. User errors (bad data, bad config, bad model name) print one line and exit
with status 2; tracebacks only appear with ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = [
    "rahf.data.commands",
    "rahf.commands",
    "rahf.evaluate.commands",
]


def user_error_types() -> tuple[type[BaseException], ...]:
    from rahf.config import ConfigError
    from rahf.data.schema import DataError
    from rahf.models import ModelError

    return (DataError, ConfigError, ModelError, FileNotFoundError, PermissionError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rahf",
        description="Align causal LMs to human preferences by representation engineering (RAHF).",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("rahf: interrupted", file=sys.stderr)
        return 130
    except user_error_types() as err:
        if args.debug:
            raise
        print(f"rahf: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if args.debug:
            raise
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        print(f"rahf: error: {err.strerror or err}{where}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
