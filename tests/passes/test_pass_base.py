"""The pass base: requires raises an IdapError, ensures sees the returned graph, errors pass through, records."""

from __future__ import annotations

import pytest
import torch
from idap_fx.passes import PASSES
from idap_fx.passes.base import IdapPass, PassContext, run_passes
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

import idap_fx
from idap_fx.errors import AnalysisError, PlanError
from idap_fx.method.budget import Budget


def _gm() -> tuple[fx.GraphModule, PassContext]:
    x = torch.randn(1, 3, 8, 8)
    gm = idap_fx.trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), x)
    return gm, PassContext(example_inputs=(x,), calibration=[(x,)], budget=Budget(gm, None, [(x,)]))


class _Broken(IdapPass):
    """Returns a new module whose graph does not lint (its output reads a node removed from the graph)."""

    name = "broken"

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        new = fx.GraphModule(graph_module, fx.Graph())
        x = new.graph.placeholder("x")
        dangling = fx.Graph().placeholder("elsewhere")
        new.graph.output((x, dangling))
        with self.timed("work"):
            pass
        return PassResult(new, True)


class _Raises(IdapPass):
    name = "raises"

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        raise PlanError("group 'conv1': bad plan")


def test_ensures_checks_the_returned_graph_not_the_input() -> None:
    gm, ctx = _gm()
    with pytest.raises(RuntimeError):
        _Broken(ctx)(gm)
    gm.graph.lint()  # the input is fine: torch's PassBase would have linted only this one


def test_requires_shapes_is_an_idap_error() -> None:
    gm, ctx = _gm()
    bare = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3)))
    with pytest.raises(AnalysisError, match="broken needs shapes on the graph: build it with idap_fx.trace"):
        _Broken(ctx)(bare)


def test_errors_pass_through_unchanged_and_records_are_typed() -> None:
    gm, ctx = _gm()
    err = None
    try:
        run_passes([_Raises(ctx)], gm)
    except PlanError as exc:
        err = exc
    assert err is not None and str(err) == "group 'conv1': bad plan" and err.__cause__ is None
    prune = PASSES["prune_channels"].pass_class(ctx, None)
    out, records = run_passes([prune], gm)
    assert records == [prune.record] and records[0].name == "PruneChannels"
    assert records[0].stop_reason and "analyze" in records[0].timings
    assert records[0].modified is (out is not gm)
