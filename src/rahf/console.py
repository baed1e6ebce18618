"""How much a run prints: ``quiet`` (results and errors), ``normal``, ``verbose`` (``rahf --quiet``,
the default, ``rahf --verbose`` / ``--debug``).

``normal`` shows one progress bar per training stage with the loss on it
(:class:`rahf.trainer.StageProgress`) and rahf's own stage notes; the libraries' own bars
(weight loading, shard writing, dataset maps) are hidden, downloads keep theirs. ``verbose`` adds
every logged step as a line and the libraries' bars and info logs. ``quiet`` drops all bars and
notes: what is left is the results a command prints and errors.

The CLI sets the level for the duration of one command (:func:`output_level`); library users get
``normal`` and can call :func:`set_level`.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Literal

Level = Literal["quiet", "normal", "verbose"]
LEVELS: tuple[Level, ...] = ("quiet", "normal", "verbose")

_level: Level = "normal"


def set_level(level: Level) -> None:
    global _level
    if level not in LEVELS:
        raise ValueError(f"output level must be one of {', '.join(LEVELS)}, got {level!r}")
    _level = level


def level() -> Level:
    return _level


def is_quiet() -> bool:
    return _level == "quiet"


def is_verbose() -> bool:
    return _level == "verbose"


def info(message: str) -> None:
    """A progress note (stage started, skipped, resumed): printed unless ``quiet``."""
    if _level != "quiet":
        print(message, flush=True)


@contextlib.contextmanager
def _tqdm_disabled() -> Iterator[None]:
    """Every tqdm bar off for the block, whoever creates it (``--quiet`` means no bars at all;
    tqdm has no switch of its own that works after import)."""
    from tqdm import std

    original = std.tqdm.__init__

    def init(self, *args, **kwargs):
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    std.tqdm.__init__ = init
    try:
        yield
    finally:
        std.tqdm.__init__ = original


@contextlib.contextmanager
def _library_output(level: Level) -> Iterator[None]:
    """transformers / datasets / huggingface_hub bars and log levels for ``level``, restored after."""
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as tf_logging

    saved_tf = (tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled())
    hub_bars_off = hub_utils.are_progress_bars_disabled()
    datasets_state = None
    if "datasets" in sys.modules or level != "verbose":
        import datasets

        datasets_state = (datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity())
    try:
        if level == "verbose":
            tf_logging.set_verbosity_info()
            tf_logging.enable_progress_bar()
        else:
            tf_logging.set_verbosity(logging.ERROR if level == "quiet" else saved_tf[0])
            tf_logging.disable_progress_bar()  # also turns the hub's bars off ...
            if level == "normal" and not hub_bars_off:
                hub_utils.enable_progress_bars()  # ... but a download keeps its bar
            datasets.disable_progress_bars()
            if level == "quiet":
                datasets.logging.set_verbosity_error()
        yield
    finally:
        tf_logging.set_verbosity(saved_tf[0])
        (tf_logging.enable_progress_bar if saved_tf[1] else tf_logging.disable_progress_bar)()
        (hub_utils.disable_progress_bars if hub_bars_off else hub_utils.enable_progress_bars)()
        if datasets_state is not None:
            import datasets

            (datasets.enable_progress_bars if datasets_state[0] else datasets.disable_progress_bars)()
            datasets.logging.set_verbosity(datasets_state[1])


@contextlib.contextmanager
def output_level(level: Level, *, libraries: bool = True) -> Iterator[None]:
    """Run a block at ``level``: rahf's notes and bars, the libraries' bars and logs, and
    :data:`KNOWN_LIBRARY_DEPRECATIONS` ignored. Restores everything afterwards (tests call the CLI
    many times in one process). ``libraries=False`` leaves transformers / datasets alone (and
    unimported: 1.5 s of CPU) for commands that never load them."""
    previous = _level
    set_level(level)
    try:
        with contextlib.ExitStack() as stack:
            if libraries:
                stack.enter_context(_library_output(level))
            stack.enter_context(library_deprecations_ignored())  # a CLI command runs only rahf's calls
            if level == "quiet":
                stack.enter_context(_tqdm_disabled())
            yield
    finally:
        set_level(previous)


# Deprecation warnings one library raises from inside another's code, where no call of ours can
# avoid them: (message regex, category, why).
KNOWN_LIBRARY_DEPRECATIONS: list[tuple[str, type[Warning], str]] = [
    (
        r"`is_gradient_checkpointing` is deprecated",
        FutureWarning,
        "peft <= 0.21 reads model.is_gradient_checkpointing each time it wraps a model;"
        " transformers >= 5.23 deprecated it for is_activation_checkpointing",
    ),
]


@contextlib.contextmanager
def library_deprecations_ignored() -> Iterator[None]:
    """Ignore exactly :data:`KNOWN_LIBRARY_DEPRECATIONS` inside the block; every other warning,
    and these ones outside rahf's calls, still show."""
    import warnings

    with warnings.catch_warnings():
        for message, category, _why in KNOWN_LIBRARY_DEPRECATIONS:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield
