"""The fault hook point: silent by default, acts on RAHF_FAULT or an installed handler."""

from __future__ import annotations

import errno
import math

import pytest

from rahf import faults


def test_points_do_nothing_unless_a_fault_names_them(monkeypatch):
    monkeypatch.delenv(faults.FAULT_ENV, raising=False)
    assert faults.fault_point("stage:fit") is False
    monkeypatch.setenv(faults.FAULT_ENV, "nan@loss:fit:3")
    assert faults.fault_point("loss:fit:2") is False
    assert faults.fault_point("loss:fit:3") is True
    assert math.isnan(faults.poisoned(1.5, "loss:fit:3")) and faults.poisoned(1.5, "loss:fit:2") == 1.5


def test_enospc_names_the_path_being_written(monkeypatch):
    monkeypatch.setenv(faults.FAULT_ENV, "enospc@write:run/final")
    with pytest.raises(OSError) as raised:
        faults.fault_point("write:run/final", "/runs/x/final")
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == "/runs/x/final"


def test_an_installed_handler_sees_every_point_instead_of_the_environment(monkeypatch):
    monkeypatch.setenv(faults.FAULT_ENV, "kill@stage:data")  # would kill this process if read
    seen = []
    faults.install(lambda point, path: seen.append((point, path)) or point == "loss:fit:1")
    try:
        assert faults.fault_point("stage:data") is False
        assert faults.fault_point("loss:fit:1") is True
    finally:
        faults.install(None)
    assert seen == [("stage:data", None), ("loss:fit:1", None)]
