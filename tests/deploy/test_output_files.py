"""Output files (docs/hardening.md, idap_fx/deploy/files.py): written whole or not at all by every writer,
bad paths refused before any work with an ``ExportError`` naming them, and Ctrl-C leaving nothing."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from helpers import SMALL_X as X
from helpers import Guard, raising
from helpers import optimize_small as _optimize
from helpers import small_calibration as _cal
from helpers import small_net as _net
from torch import nn

import idap_fx
import idap_fx.deploy.onnx_export
from idap_fx.deploy import serialize
from idap_fx.deploy.onnx_export import export_onnx
from idap_fx.errors import BudgetError, ExportError, ParityError
from idap_fx.pipeline import run_job

# --- KeyboardInterrupt ----------------------------------------------------------------------------


def _interrupted_calibration() -> Iterator[torch.Tensor]:
    yield from _cal(2)
    raise KeyboardInterrupt


def _interrupt_on_call(n: int) -> Callable[[nn.Module], float]:
    """An evaluate that works ``n - 1`` times (so pruning is under way) and is then interrupted."""
    calls = []

    def evaluate(_: nn.Module) -> float:
        calls.append(1)
        if len(calls) >= n:
            raise KeyboardInterrupt
        return 1.0

    return evaluate


@pytest.mark.parametrize("where", ["calibration", "evaluate"])
def test_keyboard_interrupt_propagates_and_leaves_no_file(tmp_path, where):
    model = _net()
    guard = Guard(model)
    kw: dict[str, Any] = {"target_macs": 0.5, "quiet": True, "latency": False}
    if where == "calibration":
        kw |= {"calibration": _interrupted_calibration(), "budget": None}
    else:
        kw |= {"evaluate": _interrupt_on_call(3), "budget": 0.5}
    (tmp_path / "keep.txt").write_text("unrelated")
    with pytest.raises(KeyboardInterrupt):
        run_job(model, X, out=tmp_path / "m.onnx", report=tmp_path / "r.json", **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]  # no output, no temporary file
    guard.intact()


def test_keyboard_interrupt_during_export_leaves_no_file(optimized, tmp_path, monkeypatch):
    monkeypatch.setattr(idap_fx.deploy.onnx_export, "_parity", raising(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        export_onnx(optimized.model, X, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


# --- output paths ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def optimized() -> idap_fx.OptimizeResult:
    return _optimize(_net())


def _writers(
    res: idap_fx.OptimizeResult, tmp: os.PathLike[str]
) -> dict[str, Callable[[os.PathLike[str]], Any]]:
    """Every public way to write a file, by name."""
    return {
        "export_onnx": lambda p: export_onnx(res.model, X, p),
        "save": lambda p: serialize.save(res.model, p),
        "run_job": lambda p: run_job(
            _net(), X, out=p, report=None, latency=False, target_macs=0.5, budget=None, quiet=True
        ),
        "run_job-report": lambda p: run_job(
            _net(), X, out=os.path.join(tmp, "ok.onnx"), report=p, latency=False, target_macs=0.5, budget=None,
            quiet=True,
        ),
    }  # fmt: skip


@pytest.mark.parametrize("writer", ["export_onnx", "save", "run_job", "run_job-report"])
@pytest.mark.parametrize("where", ["missing-dir", "under-a-file"])
def test_output_in_a_missing_directory_is_an_export_error(optimized, tmp_path, writer, where):
    (tmp_path / "a_file").write_text("x")
    path = tmp_path / ("missing" if where == "missing-dir" else "a_file") / "out.onnx"
    with pytest.raises(ExportError, match=r"cannot write .*out\.onnx: directory .* does not exist"):
        _writers(optimized, tmp_path)[writer](path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.parametrize("writer", ["export_onnx", "save", "run_job"])
def test_output_in_a_read_only_directory_is_an_export_error(optimized, tmp_path, monkeypatch, writer):
    """Simulated: the tests run as root, whom chmod does not stop. ``run_job`` asks ``os.access``
    up front; ``export_onnx`` / ``save`` find out by creating their temporary file (``os.open``)."""
    read_only = tmp_path / "ro"
    read_only.mkdir()
    writers = _writers(optimized, tmp_path)
    real_open, real_access = os.open, os.access

    def denied_open(path: Any, *args: Any, **kw: Any) -> int:
        if os.path.dirname(os.fspath(path)) == str(read_only):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_open(path, *args, **kw)

    def denied_access(path: Any, mode: int, *args: Any, **kw: Any) -> bool:
        return (
            False
            if os.fspath(path) == str(read_only) and mode & os.W_OK
            else real_access(path, mode, *args, **kw)
        )

    monkeypatch.setattr(os, "open", denied_open)
    monkeypatch.setattr(os, "access", denied_access)
    with pytest.raises(ExportError, match=r"cannot write .*out\.onnx: .*(not writable|Permission denied)"):
        writers[writer](read_only / "out.onnx")
    assert list(read_only.iterdir()) == []


def test_existing_output_is_replaced_atomically_only_on_success(optimized, tmp_path):
    """Decision: an existing file is overwritten, atomically (os.replace), and only by a verified model."""
    model, res = _net(), optimized
    path = tmp_path / "model.onnx"
    path.write_bytes(b"old model")
    with pytest.raises(ParityError):
        export_onnx(res.model, X, path, rtol=-1.0)  # no error is small enough: the check fails
    assert path.read_bytes() == b"old model"
    with pytest.raises(BudgetError):
        run_job(model, X, out=path, report=None, latency=False, target_macs=0.01, budget=1e-6, quiet=True)
    assert path.read_bytes() == b"old model"
    report = export_onnx(res.model, X, path)
    assert path.read_bytes()[:9] != b"old model" and report.onnx_bytes == path.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


@pytest.mark.parametrize("writer", ["export_onnx", "save", "run_job"])
def test_output_path_that_is_a_directory_is_an_export_error(optimized, tmp_path, writer):
    (tmp_path / "out.onnx").mkdir()
    with pytest.raises(ExportError, match=r"cannot write .*out\.onnx: it is a directory"):
        _writers(optimized, tmp_path)[writer](tmp_path / "out.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]
    assert list((tmp_path / "out.onnx").iterdir()) == []
