"""The hardening catalogue (docs/hardening.md): bad input and faults fail loudly and cleanly.

For every case: the documented ``IdapError`` subclass (or the user's own
``KeyboardInterrupt``) with a message naming the node / module / argument and saying
what to do, no file left behind, and the caller's model bit-identical
(``state_hash``) and still giving its original output.
"""

from __future__ import annotations

import errno
import math
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from helpers import random_plan, rel_err, state_hash
from torch import nn

import idap_fx
import idap_fx.onnx_export
from idap_fx import serialize
from idap_fx.errors import BudgetError, ExportError, IdapError, ParityError, TraceError
from idap_fx.onnx_export import export_onnx
from idap_fx.pipeline import run_job

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _cal(n: int = 3, shape: tuple[int, ...] = (2, 3, 8, 8)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def _net() -> nn.Module:
    """conv-BN-ReLU(inplace) -> conv -> pool -> linear: two prunable groups, milliseconds per run."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()


class Guard:
    """The caller's model and tensors, fingerprinted before a call; ``intact()`` checks them after."""

    def __init__(self, model: nn.Module, *tensors: torch.Tensor) -> None:
        self.model = model
        self.hash = state_hash(model)
        self.tensors = [(t, t.clone()) for t in tensors]
        self.x = tensors[0] if tensors else X
        with torch.no_grad():
            self.y = model(self.x.clone())

    def intact(self) -> None:
        assert state_hash(self.model) == self.hash, "the caller's model was modified"
        for t, copy_ in self.tensors:
            assert torch.equal(t, copy_), "the caller's tensor was modified"
        with torch.no_grad():
            assert torch.equal(self.model(self.x.clone()), self.y), "the caller's model no longer works"


def _optimize(model: nn.Module, **kw: Any) -> idap_fx.OptimizeResult:
    kw = {"calibration": _cal(), "target_macs": 0.5, "budget": None, "quiet": True} | kw
    return idap_fx.optimize(model, X, **kw)


# --- untraceable model ---------------------------------------------------------------------------


class _Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


def test_untraceable_model_names_module_and_construct_and_writes_nothing(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _Gate()).eval()
    guard = Guard(model)
    with pytest.raises(TraceError, match=r"inside module '1' \(_Gate\).*x\.sum\(\) > 0.*leaf_modules"):
        _optimize(model)
    out, rep = tmp_path / "m.onnx", tmp_path / "r.json"
    with pytest.raises(TraceError):
        run_job(model, X, out=out, report=rep, latency=False, target_macs=0.5, budget=None, quiet=True)
    assert list(tmp_path.iterdir()) == []
    guard.intact()


# --- in-place ops and state mutated in forward --------------------------------------------------


class _InplaceResidual(nn.Module):
    """Residual adds written in place (``add_`` and ``+=``) on activations, ReLU(inplace=True)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 3, padding=1)
        self.c = nn.Conv2d(6, 6, 1)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.a(x))
        z = self.b(y)
        z.add_(y)
        w = self.c(z)
        w += z
        return self.head(w.relu_())


def test_inplace_activation_functions_have_rules():
    gm = idap_fx.trace(nn.Sequential(nn.Conv2d(3, 4, 1), _Call(torch.relu_), nn.Conv2d(4, 2, 1)), X)
    assert not idap_fx.analyze(gm).boundaries


class _Call(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def test_inplace_ops_on_activations_are_analyzed_and_pruned_exactly():
    model = _InplaceResidual().eval()
    guard = Guard(model, X)
    gm = idap_fx.trace(model, X)
    dg = idap_fx.analyze(gm)
    # both in-place adds tie a, b and c into one group, as the out-of-place adds would
    (group,) = dg.prunable
    assert {m.param for m in group.members} >= {"a.weight", "b.weight", "c.weight", "head.weight"}
    plan = random_plan(dg, 0.5, seed=3)
    pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
    assert pruned.a.out_channels == 3
    with torch.no_grad():
        assert rel_err(pruned(X), masked(X)) <= 1e-5
    res = _optimize(model)
    assert res.report.target_reached
    guard.intact()


class _InplaceOnInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return self.conv(x)


class _InplaceReluOnInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.act(x[:, :3]))  # a view of the input: still the caller's tensor


@pytest.mark.parametrize(
    ("cls", "node"),
    [
        (_InplaceOnInput, "node 'mul_' (call_method mul_)"),
        (_InplaceReluOnInput, "node 'act' (call_module act)"),
    ],
    ids=["mul_", "relu-inplace-on-view"],
)
def test_inplace_op_on_an_input_is_refused_and_the_input_is_untouched(cls, node):
    model = cls().eval()
    x = X.clone()
    guard = Guard(model)  # runs the model on a clone: its own forward would change x
    before = x.clone()
    with pytest.raises(TraceError) as info:
        idap_fx.trace(model, x)
    assert f"{node} modifies example input 'x' in place" in str(info.value)
    assert "out-of-place" in str(info.value)
    assert torch.equal(x, before)  # refused after the op ran, on a copy of the input
    with pytest.raises(TraceError, match="modifies example input"):
        _optimize(model)
    guard.intact()


class _Counter(nn.Module):
    """A call counter kept in a buffer: ``self.calls += 1`` runs eagerly while fx traces."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.conv(x)


class _RunningMean(nn.Module):
    """A running statistic updated in the graph itself (``add_`` of a traced value)."""

    def __init__(self, guarded: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.guarded = guarded
        self.register_buffer("mean", torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if not self.guarded or self.training:
            self.mean.add_(y.mean((0, 2, 3)))
        return y


class _Reassign(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.register_buffer("ema", torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        self.ema = 0.9 * self.ema + 0.1 * y.mean((0, 2, 3)).detach()
        return y


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_Counter, r"_Counter\.forward\(\) modifies 'calls' while being traced"),
        (_Reassign, r"_Reassign\.forward\(\) reassigns 'ema' while being traced"),
        (_RunningMean, r"node 'add_' \(call_method add_\) modifies buffer 'mean' in place"),
    ],
    ids=["counter", "reassigned", "in-graph-update"],
)
def test_buffer_mutated_in_forward_is_refused_naming_the_buffer(make, message):
    """Decision: refuse (a stateful forward cannot be pruned reproducibly); the fix is in the message."""
    model = make().eval()
    before = state_hash(model)  # no Guard: running this model changes it by design
    for run in (lambda: idap_fx.trace(model, X), lambda: _optimize(model)):
        with pytest.raises(TraceError, match=message) as info:
            run()
        assert "if self.training:" in str(info.value)
    assert state_hash(model) == before
    with torch.no_grad():
        assert model(X).shape == (2, 4, 8, 8)


def test_state_update_guarded_by_training_traces_in_eval_mode():
    model = _RunningMean(guarded=True).train()
    gm = idap_fx.trace(model, X)
    assert "add_" not in gm.code
    assert model.training  # the caller's mode is kept: trace works on an eval copy


# --- integer, quantized and half-precision models ---------------------------------------------


def test_integer_model_is_refused_by_optimize():
    model = nn.Sequential(nn.Linear(4, 3))
    model[0].weight = nn.Parameter(torch.ones(3, 4, dtype=torch.int32), requires_grad=False)
    before = state_hash(model)
    with pytest.raises(TraceError, match=r"parameter '0\.weight' has dtype torch\.int32.*floating-point"):
        idap_fx.optimize(model, torch.ones(2, 4, dtype=torch.int32), target_macs=0.5, quiet=True)
    assert state_hash(model) == before


@pytest.fixture
def quantized_linear() -> nn.Module:
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(float_model, {nn.Linear}, dtype=torch.qint8)


def test_quantized_model_is_refused_naming_the_module(quantized_linear):
    x = torch.randn(2, 4)
    with torch.no_grad():
        y = quantized_linear(x)
    for run in (
        lambda: idap_fx.trace(quantized_linear, x),
        lambda: idap_fx.optimize(quantized_linear, x, target_macs=0.5, quiet=True),
    ):
        with pytest.raises(TraceError, match=r"module '0' is a quantized Linear.*prune the float model"):
            run()
    with torch.no_grad():
        assert torch.equal(quantized_linear(x), y)


def test_quantized_example_input_is_refused():
    with warnings.catch_warnings():  # quantized tensors are deprecated
        warnings.simplefilter("ignore")
        xq = torch.quantize_per_tensor(X, 0.1, 0, torch.quint8)
    with pytest.raises(TraceError, match=r"example input 0 is a quantized tensor \(torch\.quint8\)"):
        idap_fx.trace(_net(), xq)


def test_half_precision_model_is_supported_end_to_end(tmp_path):
    """Decision: float16 models are pruned in float16 (statistics are accumulated in float32/64)."""
    model = _net().half()
    guard = Guard(model, X.half())
    res = idap_fx.optimize(
        model, X.half(), calibration=[c.half() for c in _cal()], target_macs=0.5, budget=0.05, quiet=True
    )
    assert res.report.target_reached and res.report.budget_consumed <= 0.05
    assert {p.dtype for p in res.model.parameters()} == {torch.float16}
    gm = idap_fx.trace(model, X.half())
    dg = idap_fx.analyze(gm)
    plan = random_plan(dg, 0.5, seed=1)
    with torch.no_grad():
        assert rel_err(idap_fx.prune(gm, plan, dg)(X.half()), idap_fx.mask(gm, plan, dg)(X.half())) <= 1e-3
    report = res.export_onnx(tmp_path / "half.onnx")
    assert report.max_rel_error <= 1e-4
    guard.intact()


# --- wrong example inputs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "cause"),
    [
        (X[0], "ValueError: expected 4D input (got 3D input)"),
        (X.double(), "Input type (double) and bias type (float) should be the same"),
        (X.long(), "Input type (long int) and bias type (float) should be the same"),
    ],
    ids=["rank-3", "float64", "int64"],
)
def test_wrong_example_input_names_node_input_shape_and_cause(x, cause):
    model = _net()
    guard = Guard(model)
    for run in (lambda: idap_fx.trace(model, x), lambda: idap_fx.optimize(model, x, quiet=True)):
        with pytest.raises(TraceError) as info:
            run()
        msg = str(info.value)
        assert "failed on the example inputs ('input_1': " + f"{tuple(x.shape)} {x.dtype})" in msg, msg
        assert "rank, shape and dtype" in msg and cause in msg, msg
        assert "While executing" not in msg and "ShapeProp error" not in msg, msg
    guard.intact()


# --- calibration data ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("calibration", "message"),
    [
        ([X, torch.randn(2, 3, 6, 6)], r"calibration batch 1 input 0 has shape \(2, 3, 6, 6\)"),
        ([X, X[0]], r"calibration batch 1 input 0 has shape \(3, 8, 8\)"),
        ([X.double()], r"calibration batch 0 input 0 has shape \(2, 3, 8, 8\) torch\.float64"),
        ([X, "image.png"], r"calibration batch 1 input 0 is a str, not a tensor"),
        ([], "calibration is empty"),
        (iter([]), "calibration is empty"),
        ([X, X.clone().fill_(math.nan)], "calibration batch 1 input 0 contains NaN or Inf"),
        ([X.clone().fill_(math.inf)], "calibration batch 0 input 0 contains NaN or Inf"),
    ],
    ids=["spatial", "rank", "dtype", "not-a-tensor", "empty-list", "empty-iterator", "nan", "inf"],
)
def test_bad_calibration_is_refused_before_any_work(calibration, message):
    model = _net()
    guard = Guard(model)
    with pytest.raises(IdapError, match=message):
        _optimize(model, calibration=calibration)
    guard.intact()


# --- NaN / Inf in weights or inputs -------------------------------------------------------------


@pytest.mark.parametrize(("param", "value"), [("0.weight", math.nan), ("1.running_var", math.inf)])
def test_nan_or_inf_in_the_weights_names_the_tensor(param, value):
    model = _net()
    with torch.no_grad():
        dict(model.named_parameters()).get(param, dict(model.named_buffers()).get(param)).view(-1)[0] = value
    before = state_hash(model)
    with pytest.raises(IdapError, match=rf"{param} contains NaN or Inf: fix the model's weights"):
        _optimize(model)
    assert state_hash(model) == before


def test_nan_in_the_example_input_is_refused():
    x = X.clone()
    x[0, 0, 0, 0] = math.nan
    with pytest.raises(IdapError, match="example input 0 contains NaN or Inf"):
        idap_fx.optimize(_net(), x, target_macs=0.5, budget=None, quiet=True)


# --- targets and budgets ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"target_macs": 0}, r"target_macs=0 is impossible.*in \(0, 1\)"),
        ({"target_macs": -0.2}, r"target_macs=-0\.2 is impossible"),
        ({"target_macs": 1}, r"target_macs=1 is impossible"),
        ({"target_macs": 1.5}, r"target_macs=1\.5 is impossible"),
        ({"target_macs": math.nan}, r"target_macs must be a fraction.*got nan"),
        ({"target_macs": True}, r"target_macs must be a fraction.*got True"),
        ({"target_params": 0.0}, r"target_params=0\.0 is impossible"),
        ({"budget": -0.01}, r"budget must be None or a number >= 0, got -0\.01"),
        ({"budget": math.nan}, r"budget must be None or a number >= 0, got nan"),
        ({"budget": "5%"}, r"budget must be None or a number >= 0, got '5%'"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else None,
)
def test_impossible_targets_and_budgets_are_budget_errors(kw, message):
    model = _net()
    guard = Guard(model)
    with pytest.raises(BudgetError, match=message) as info:
        _optimize(model, **({"budget": 0.05} | kw))
    assert isinstance(info.value, ValueError)
    guard.intact()


def test_no_target_and_no_budget_is_refused():
    with pytest.raises(IdapError, match="nothing to aim for: give a target .* or a budget"):
        _optimize(_net(), target_macs=None, budget=None)


def test_target_unreachable_within_budget_returns_the_best_model_on_the_error():
    model = _net()
    guard = Guard(model)
    with pytest.raises(
        BudgetError, match="target not reached.*the most compressed model within budget"
    ) as info:
        _optimize(model, target_macs=0.05, budget=1e-3)
    best = info.value.result
    assert best.report.target_reached is False
    assert best.report.budget_consumed <= 1e-3
    assert any(not s["accepted"] for s in best.report.steps)  # a step broke the budget and was rolled back
    with torch.no_grad():
        assert best.model(X).shape == (2, 4)
    loose = _optimize(model, target_macs=0.05, budget=1e-3, strict=False)  # no error without strict
    assert loose.report.macs_after == best.report.macs_after
    guard.intact()


# --- user callbacks -----------------------------------------------------------------------------


def _raise(exc: BaseException) -> Callable[..., Any]:
    def callback(*_: Any) -> Any:
        raise exc

    return callback


def _returns_after_first(first: float, then: float) -> Callable[[nn.Module], float]:
    calls = []

    def evaluate(_: nn.Module) -> float:
        calls.append(1)
        return first if len(calls) == 1 else then

    return evaluate


@pytest.mark.parametrize(
    ("evaluate", "message"),
    [
        (
            _raise(RuntimeError("dataset offline")),
            "the evaluate callback raised RuntimeError: dataset offline",
        ),
        (lambda _: math.nan, "the evaluate callback returned NaN"),
        (_returns_after_first(0.9, math.nan), "the evaluate callback returned NaN"),
        (lambda _: None, "the evaluate callback raised TypeError"),
    ],
    ids=["raises", "nan", "nan-later", "none"],
)
def test_evaluate_that_raises_or_returns_nan(evaluate, message):
    model = _net()
    guard = Guard(model)
    with pytest.raises(BudgetError, match=message) as info:
        _optimize(model, budget=0.05, evaluate=evaluate)
    if "dataset offline" in message:
        assert isinstance(info.value.__cause__, RuntimeError)  # the user's traceback is kept
    guard.intact()


def test_evaluate_returning_inf_is_refused():
    with pytest.raises(BudgetError, match="the evaluate callback returned"):
        _optimize(_net(), budget=0.05, evaluate=lambda _: math.inf)


def _reshape_first_conv(model: nn.Module, _: nn.Module) -> None:
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    conv.weight = nn.Parameter(conv.weight[:1].clone())


def _poison(model: nn.Module, _: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(math.nan)


@pytest.mark.parametrize(
    ("fine_tune", "kw", "message"),
    [
        (_raise(ValueError("lr too high")), {}, "the fine_tune callback raised ValueError: lr too high"),
        (
            _reshape_first_conv,
            {},
            r"the fine_tune callback changed '0\.weight' from \(\d, 3, 3, 3\) to \(1, 3, 3, 3\)",
        ),
        (
            _poison,
            {"budget": None},
            r"contains NaN or Inf: recovery \(fine_tune callback or distillation\) diverged",
        ),
    ],
    ids=["raises", "reshapes", "nan-weights"],
)
def test_fine_tune_that_raises_reshapes_or_diverges(fine_tune, kw, message):
    model = _net()
    guard = Guard(model)
    with pytest.raises(IdapError, match=message):
        _optimize(model, fine_tune=fine_tune, **kw)
    guard.intact()


def test_fine_tune_that_diverges_under_a_budget_is_rolled_back():
    res = _optimize(_net(), fine_tune=_poison, budget=0.05, strict=False)
    assert res.report.macs_ratio == 1.0 and not any(s["accepted"] for s in res.report.steps)
    assert all(torch.isfinite(p).all() for p in res.model.parameters())


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
    monkeypatch.setattr(idap_fx.onnx_export, "_parity", _raise(KeyboardInterrupt()))
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


# --- shared (tied) weights ------------------------------------------------------------------------


class _LinearTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.shared = nn.Linear(8, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.shared(torch.relu(self.a(x)))
        return self.b(self.shared(torch.relu(y)))


class _TiedLM(nn.Module):
    """Embedding and LM head share one matrix (weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mid(self.emb(tokens))))


class _TiedConvs(nn.Module):
    """Two distinct convs holding one weight tensor: its in and out channels tie three groups into one."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(6, 6, 3, padding=1)
        self.c = nn.Conv2d(6, 6, 3, padding=1)
        self.c.weight = self.b.weight
        self.d = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))


TIED = {
    "linear-used-twice": (_LinearTwice, lambda: torch.randn(2, 6), {"a.weight", "shared.weight", "b.weight"}),
    "embedding-lm-head": (_TiedLM, lambda: torch.randint(0, 10, (2, 5)), {"emb.weight", "mid.weight", "head.weight"}),
    "tied-convs": (_TiedConvs, lambda: X, {"a.weight", "b.weight", "c.weight", "d.weight"}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(TIED))
def test_tied_weights_are_one_group_and_prune_matches_mask(case):
    make, inputs, params = TIED[case]
    torch.manual_seed(0)
    model, x = make().eval(), inputs()
    guard = Guard(model, x)
    gm = idap_fx.trace(model, x)
    dg = idap_fx.analyze(gm)
    (group,) = dg.prunable
    assert {m.param for m in group.members} >= params
    plan = random_plan(dg, 0.5, seed=2)
    pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
    with torch.no_grad():
        assert rel_err(pruned(x), masked(x)) <= 1e-5
    res = idap_fx.optimize(model, x, target_params=0.8, budget=None, quiet=True, strict=False)
    assert res.report.params_after < res.report.params_before
    guard.intact()


@pytest.mark.parametrize("case", ["embedding-lm-head", "tied-convs"])
def test_prune_keeps_tied_weights_tied(case):
    make, inputs, _ = TIED[case]
    torch.manual_seed(0)
    model, x = make().eval(), inputs()
    gm = idap_fx.trace(model, x)
    n_before = len(list(gm.parameters()))
    pruned = idap_fx.prune(gm, random_plan(idap_fx.analyze(gm), 0.5, seed=2))
    assert len(list(pruned.parameters())) == n_before


# --- devices ------------------------------------------------------------------------------------


def test_meta_device_model_with_cpu_inputs_is_refused_naming_the_parameter():
    model = _net().to("meta")
    with pytest.raises(TraceError, match=r"example input 0 is on cpu but the model's '0\.weight' is on meta"):
        idap_fx.trace(model, X)
    with pytest.raises(TraceError, match="a meta-device model has no weights: load them first"):
        _optimize(model)


def test_meta_device_model_can_be_analyzed_but_not_optimized():
    """Decision: structure needs no values (trace/analyze/prune on meta work); optimize needs weights."""
    model, x = _net().to("meta"), X.to("meta")
    gm = idap_fx.trace(model, x)
    dg = idap_fx.analyze(gm)
    assert [g.id for g in dg.prunable] == [g.id for g in idap_fx.analyze(idap_fx.trace(_net(), X)).prunable]
    assert idap_fx.prune(gm, {dg.prunable[0].id: [0, 1]}, dg).get_submodule("0").out_channels == 6
    with pytest.raises(
        IdapError, match=r"0\.weight is on the meta device \(no values\): optimize needs the weights"
    ):
        idap_fx.optimize(model, x, target_macs=0.5, budget=None, quiet=True)
