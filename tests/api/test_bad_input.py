"""Bad input gives a clear, documented error, and the caller's model is bit-identical afterwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from helpers import state_hash
from torch import fx, nn

import idap_fx


class _Gate(nn.Module):
    """Data-dependent control flow: fx cannot know which branch a Proxy takes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x
        return -x


class _RootBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        for _ in range(int(y.mean())):
            y = y + 1
        return y


class _Chunked(nn.Module):
    """One conv whose two halves feed two layers: each half is a part of the group."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(4, 2, 1)
        self.c = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.a(x).chunk(2, dim=1)
        return self.b(u) + self.c(v)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 32, 32)
    gm = idap_fx.trace(model, x)
    return model, x, gm, idap_fx.analyze(gm)


def test_data_dependent_branch_in_a_submodule_names_module_and_construct():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _Gate())
    before = state_hash(model)
    with pytest.raises(idap_fx.TraceError) as info:
        idap_fx.trace(model, torch.randn(1, 3, 8, 8))
    msg = str(info.value)
    assert "inside module '1' (_Gate)" in msg
    assert "if x.sum() > 0:" in msg
    assert "leaf_modules" in msg and "concrete_args" in msg
    assert state_hash(model) == before


def test_data_dependent_loop_in_the_root_names_the_model():
    model = _RootBranch()
    before = state_hash(model)
    with pytest.raises(idap_fx.TraceError) as info:
        idap_fx.trace(model, torch.randn(1, 3, 8, 8))
    msg = str(info.value)
    assert "_RootBranch" in msg and "'<root>'" in msg
    assert "for _ in range(int(y.mean())):" in msg
    assert state_hash(model) == before


def test_data_dependent_branch_made_a_leaf_traces_with_frozen_channels():
    """The hint in the error works: a leaf module is a boundary, so its channels freeze."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _Gate(), nn.Conv2d(4, 2, 1))
    gm = idap_fx.trace(model, torch.randn(1, 3, 8, 8), leaf_modules=[_Gate])
    dg = idap_fx.analyze(gm)
    assert "_Gate" in dg.boundaries["_1"]
    assert not dg.group("_0").prunable and "_Gate" in dg.group("_0").frozen_reason


_PLAN_ERRORS = [
    ({"fc": [0]}, "fc", "frozen"),
    ({"x:dim1": [0]}, "x:dim1", "frozen"),
    ({"no_such_group": [0]}, "no_such_group", "unknown group"),
    ({"conv1": [64]}, "conv1", "out of range"),
    ({"conv1": [-1]}, "conv1", "out of range"),
    ({"conv1": [3, 3]}, "conv1", "duplicate"),
    ({"conv1": list(range(64))}, "conv1", "removes all 64 units"),
    ({"conv1": [1.0]}, "conv1", "must be integers"),
    ({"conv1": [True]}, "conv1", "must be integers"),
]


@pytest.mark.parametrize(("plan", "group", "what"), _PLAN_ERRORS, ids=[w for _, _, w in _PLAN_ERRORS])
@pytest.mark.parametrize("apply", [idap_fx.prune, idap_fx.mask], ids=["prune", "mask"])
def test_invalid_plan_is_a_value_error_naming_the_group(resnet, apply, plan, group, what):
    model, _, gm, dg = resnet
    model_before, gm_before = state_hash(model), state_hash(gm)
    with pytest.raises(idap_fx.PlanError) as info:
        apply(gm, plan, dg)
    assert f"'{group}'" in str(info.value) and what in str(info.value)
    assert isinstance(info.value, ValueError)
    with pytest.raises(idap_fx.PlanError, match=what):  # also when prune analyzes by itself
        apply(gm, plan)
    assert state_hash(model) == model_before
    assert state_hash(gm) == gm_before


def test_plan_that_empties_one_part_of_a_group_names_group_and_part():
    model = _Chunked().eval()
    before = state_hash(model)
    gm = idap_fx.trace(model, torch.randn(1, 3, 4, 4))
    dg = idap_fx.analyze(gm)
    assert dg.group("a").size == 8
    with pytest.raises(idap_fx.PlanError, match=r"group 'a'.*every channel of b\.weight dim 1"):
        idap_fx.prune(gm, {"a": [0, 1, 2, 3]}, dg)
    idap_fx.prune(gm, {"a": [0, 1, 2, 4, 5, 6]}, dg)  # one channel left in each half is fine
    assert state_hash(model) == before


@pytest.mark.parametrize(
    "plan", [{}, {"conv1": []}, {"fc": []}], ids=["no-groups", "empty-list", "frozen-empty"]
)
def test_empty_plan_returns_an_equivalent_copy(resnet, plan):
    """Decision: a plan that removes nothing is valid and returns a new, identical GraphModule."""
    model, x, gm, dg = resnet
    before = state_hash(gm)
    for apply in (idap_fx.prune, idap_fx.mask):
        out = apply(gm, plan, dg)
        assert out is not gm
        assert state_hash(out) == before
        assert out.code == gm.code
        with torch.no_grad():
            assert torch.equal(out(x), gm(x))
    assert state_hash(gm) == before
    assert state_hash(model) == state_hash(idap_fx.trace(model, x))


def test_numpy_integer_indices_are_accepted(resnet):
    _, _, gm, dg = resnet
    pruned = idap_fx.prune(gm, {"conv1": np.array([1, 2])}, dg)
    assert pruned.conv1.out_channels == 62


class _IntBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.register_buffer("offset", torch.arange(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.offset


def test_integer_buffers_are_fine():
    """Only parameters must be floating: integer buffers (indices, counters) are common."""
    model = _IntBuffer().eval()
    x = torch.randn(2, 4)
    gm = idap_fx.trace(model, x)
    assert gm.offset.dtype == torch.int64
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


_BAD_INPUTS = {
    "rank-3": (torch.randn(3, 32, 32), "bn1", "expected 4D input"),
    "rank-5": (torch.randn(1, 1, 3, 32, 32), "conv1", "Expected 3D (unbatched) or 4D (batched) input"),
    "int-dtype": (torch.ones(1, 3, 32, 32, dtype=torch.long), "conv1", "expected scalar type"),
}


@pytest.mark.parametrize("case", list(_BAD_INPUTS))
def test_wrong_example_input_names_the_input_node_and_cause(resnet, case):
    model, _, _, _ = resnet
    x, node, cause = _BAD_INPUTS[case]
    before = state_hash(model)
    with pytest.raises(idap_fx.TraceError) as info:
        idap_fx.trace(model, x)
    msg = str(info.value)
    assert "'x'" in msg and str(tuple(x.shape)) in msg, msg  # the placeholder and the shape it got
    assert f"node '{node}'" in msg, msg  # where it failed
    assert cause in msg, msg  # what actually went wrong, not only ShapeProp's wrapper
    assert state_hash(model) == before


def test_wrong_number_or_kind_of_example_inputs(resnet):
    model, x, _, _ = resnet
    before = state_hash(model)
    with pytest.raises(idap_fx.TraceError, match=r"takes 1 input\(s\), example_inputs has 2"):
        idap_fx.trace(model, (x, x))
    with pytest.raises(idap_fx.TraceError, match="example input 0 is a list"):
        idap_fx.trace(model, ([1, 2],))
    with pytest.raises(idap_fx.TraceError, match="tensor or a tuple of tensors"):
        idap_fx.trace(model, 3.0)
    with pytest.raises(idap_fx.TraceError, match="nn.Module or a GraphModule"):
        idap_fx.trace(lambda t: t, x)
    assert state_hash(model) == before


def test_analyze_refuses_a_module_that_is_not_a_graph(resnet):
    model, _, _, _ = resnet
    with pytest.raises(idap_fx.AnalysisError, match=r"idap_fx\.trace"):
        idap_fx.analyze(model)
    with pytest.raises(idap_fx.AnalysisError, match="carry no shapes"):
        idap_fx.analyze(fx.symbolic_trace(model))
