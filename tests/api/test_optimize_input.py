"""optimize() on bad data, targets and callbacks (docs/hardening.md): calibration, NaN / Inf,
impossible targets and budgets, ``evaluate`` / ``fine_tune`` that fail. Each is refused with the
documented ``IdapError`` subclass before any work (or rolled back), the caller's model intact."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from helpers import SMALL_X as X
from helpers import Guard, raising, state_hash
from helpers import optimize_small as _optimize
from helpers import small_net as _net
from torch import nn

import idap_fx
import idap_fx.deploy.onnx_export
from idap_fx.errors import BudgetError, IdapError

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
    assert loose.report.macs_after == best.report.macs_after and loose.report.target_reached is False
    guard.intact()


# --- user callbacks -----------------------------------------------------------------------------


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
            raising(RuntimeError("dataset offline")),
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
        (raising(ValueError("lr too high")), {}, "the fine_tune callback raised ValueError: lr too high"),
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
