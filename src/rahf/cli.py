"""The ``rahf`` command: a thin dispatcher over per-feature command modules.

Each module in ``COMMAND_MODULES`` has ``register(subparsers)`` which adds its sub-commands and
sets ``func`` on them. Errors print one line (``rahf: error: ...``) and no traceback unless
``--debug``: user errors (bad data, bad config, bad model name, a run folder that cannot be
written or that another run holds) exit 2; a run that cannot go on (NaN loss, full disk) exits
1; SIGINT / SIGTERM exit 130 / 143, after training has saved a checkpoint, with a note on how to
resume.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import signal
import sys
import threading

COMMAND_MODULES = [
    "rahf.data.commands",
    "rahf.commands",
    "rahf.evaluate.commands",
    "rahf.baselines.commands",
    "rahf.steering.commands",
]


def user_error_types() -> tuple[type[BaseException], ...]:
    from rahf.config import ConfigError
    from rahf.data.schema import DataError
    from rahf.models import ModelError
    from rahf.runlock import RunLocked

    return (DataError, ConfigError, ModelError, RunLocked, FileNotFoundError, PermissionError, NotADirectoryError)


def run_error_types() -> tuple[type[BaseException], ...]:
    """Errors of a run that cannot go on; the message says where it stopped."""
    from rahf.method.targets import CacheError
    from rahf.trainer import TrainingError

    return (TrainingError, CacheError)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so ``finally`` blocks and atomic writes clean up."""


def _raise_terminated(signum: int, frame) -> None:
    raise Terminated


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (YAML and library errors come with several)."""
    return " ".join(part.strip() for part in str(err).splitlines() if part.strip()) or type(err).__name__


_OS_HINTS = {
    errno.ENOSPC: "free some space, then rerun the same command: finished stages and checkpoints are kept",
    errno.EROFS: "the file system is read-only: choose another --run-dir",
    errno.EACCES: "no permission to write there: choose another --run-dir",
    errno.ENOTDIR: "a path component is a file, not a folder: choose another --run-dir",
}


def os_error_line(err: OSError) -> str:
    where = f" ({err.filename})" if getattr(err, "filename", None) and str(err.filename) not in str(err.strerror) else ""
    hint = _OS_HINTS.get(err.errno or 0)
    return f"{one_line(err) if err.strerror is None else err.strerror}{where}" + (f"; {hint}" if hint else "")


def _close_progress_bars() -> None:
    """Close progress bars an error cut short, so the message starts on a line of its own."""
    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is None:
        return
    for bar in list(getattr(tqdm_module.tqdm, "_instances", [])):
        bar.close()


def _say(message: str) -> None:
    _close_progress_bars()
    print(message, file=sys.stderr, flush=True)


def _resume_hint(args: argparse.Namespace) -> str:
    return "; finished stages and checkpoints are kept: rerun the same command to resume" if hasattr(args, "run_dir") else ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rahf",
        description="Align causal LMs to human preferences by representation engineering (RAHF).",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors (and --verbose output)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument(
        "--quiet", "-q", dest="output_level", action="store_const", const="quiet",
        help="print only results and errors: no progress bars, no stage notes",
    )
    output.add_argument(
        "--verbose", "-v", dest="output_level", action="store_const", const="verbose",
        help="also print every logged training step, and the libraries' progress bars and info logs",
    )
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
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    level = args.output_level or ("verbose" if args.debug else "normal")
    if level == "quiet" and hasattr(args, "quiet"):
        args.quiet = True  # commands with their own --quiet (rahf eval) follow the global one
    try:
        from rahf.console import output_level

        with output_level(level, libraries=args.command != "config"):  # config loads no model
            result = args.func(args)
    except KeyboardInterrupt as err:
        if args.debug:
            raise
        name = "SIGTERM" if isinstance(err, Terminated) else "SIGINT"
        _say(f"rahf: interrupted by {name}{_resume_hint(args)}")
        return 143 if isinstance(err, Terminated) else 130
    except user_error_types() as err:
        if args.debug:
            raise
        if isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and err.errno is not None:
            _say(f"rahf: error: {os_error_line(err)}")
        else:
            _say(f"rahf: error: {one_line(err)}")
        return 2
    except run_error_types() as err:
        if args.debug:
            raise
        interrupted = hasattr(err, "exit_code")  # TrainingInterrupted: not an error, a pause
        _say(f"rahf: {'' if interrupted else 'error: '}{one_line(err)}")
        return getattr(err, "exit_code", 1)
    except OSError as err:
        if args.debug:
            raise
        _say(f"rahf: error: {os_error_line(err)}")
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if "torch.distributed" in sys.modules:  # never import torch just to say goodbye
            from rahf.io import leave_process_group

            leave_process_group()
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
