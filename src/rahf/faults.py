"""One hook point for the reliability tests: break a run at an exact place, or do nothing.

Production code marks the places where a fault matters with ``fault_point("<point>")`` and
knows nothing else about faults. Outside tests nothing is installed and a point returns False.
The reliability suite (``tests/reliability/runner.py``) sets ``RAHF_FAULT="<action>@<point>"``
for the process it starts, or a test installs a handler in-process with :func:`install`.

Actions of ``RAHF_FAULT``: ``kill`` (SIGKILL this process), ``term`` / ``int`` (send it SIGTERM /
SIGINT), ``enospc`` (raise the OSError a full disk raises), ``nan`` (return True: the caller
poisons its loss). Points: ``stage:<name>`` before a stage starts, ``done:<name>`` before its
DONE.json is written, ``step:<stage>:<n>`` after optimizer step n, ``loss:<stage>:<n>`` in step
n's loss, ``save:<stage>:<n>`` when checkpoint n's weights are written but not yet its optimizer,
RNG and trainer state, and ``write:<parent>/<name>`` when an atomic folder is built but not yet
moved into place. ``path`` is the file or folder being written there, named by the ``enospc``
error as a real one would.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable
from pathlib import Path

FAULT_ENV = "RAHF_FAULT"

Handler = Callable[[str, "str | Path | None"], bool]
_handler: Handler | None = None


def install(handler: Handler | None) -> None:
    """Route every point to ``handler(point, path) -> poison?`` (None: back to ``RAHF_FAULT``)."""
    global _handler
    _handler = handler


def fault_point(point: str, path: str | Path | None = None) -> bool:
    """A place a test may break; True only when the installed fault asks to poison a loss."""
    if _handler is not None:
        return _handler(point, path)
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return False
    return env_fault(spec, point, path)


def poisoned(loss, point: str):
    """``loss``, or NaN in its place when the installed fault says ``nan`` at ``point``."""
    return loss * float("nan") if fault_point(point) else loss


def env_fault(spec: str, point: str, path: str | Path | None = None) -> bool:
    """Act on ``spec`` (``<action>@<point>``) if it names ``point``."""
    action, _, where = spec.partition("@")
    if where != point:
        return False
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action in ("term", "int"):
        os.kill(os.getpid(), signal.SIGTERM if action == "term" else signal.SIGINT)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path or point))
    return action == "nan"
