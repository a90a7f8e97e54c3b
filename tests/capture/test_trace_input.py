"""trace() on models and inputs it must refuse or handle (docs/hardening.md): untraceable
control flow, in-place updates of inputs or state, integer / quantized / half models, wrong
example inputs, other devices. Each refusal is a ``TraceError`` naming the node, module or
argument, and the caller's model is left bit-identical (``Guard``)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from helpers import SMALL_X as X
from helpers import Guard, random_plan, rel_err, state_hash
from helpers import optimize_small as _optimize
from helpers import small_calibration as _cal
from helpers import small_net as _net
from torch import nn

import idap_fx
import idap_fx.deploy.onnx_export
from idap_fx.errors import IdapError, TraceError
from idap_fx.pipeline import run_job

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


def test_integer_model_is_refused_by_trace_and_optimize():
    model = nn.Sequential(nn.Linear(4, 3))
    model[0].weight = nn.Parameter(torch.ones(3, 4, dtype=torch.int32), requires_grad=False)
    before = state_hash(model)
    x = torch.ones(2, 4, dtype=torch.int32)
    for run in (
        lambda: idap_fx.trace(model, x),
        lambda: idap_fx.optimize(model, x, target_macs=0.5, quiet=True),
    ):
        with pytest.raises(TraceError, match=r"parameter '0\.weight' has dtype torch\.int32.*floating-point"):
            run()
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
