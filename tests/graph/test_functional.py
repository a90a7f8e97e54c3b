"""Functional layer forms, traced-through subclasses and GroupNorm groups: prunable and exact.

A layer written with ``F.conv2d`` / ``F.batch_norm`` / ``F.group_norm`` ... and its own
parameters (read by ``get_attr``) must give the same groups as the module, on the fx
path and on ``torch.export`` graphs; GroupNorm's units are whole groups (exact).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import expected_param_shapes, random_plan, rel_err
from torch import nn

import idap_fx
from idap_fx.capture.torch_export import from_exported


def _oracle(gm: torch.fx.GraphModule, plan: dict, *args) -> torch.fx.GraphModule:
    """prune == mask on ``plan``, the plan changes the output, and parameters have the planned shapes."""
    dg = idap_fx.analyze(gm)
    pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
    with torch.no_grad():
        out_p, out_m, out_0 = pruned(*args), masked(*args), gm(*args)
    assert rel_err(out_p, out_m) <= 1e-5
    assert rel_err(out_p, out_0) > 1e-3
    shapes = expected_param_shapes(gm, dg.expected_numel(plan))
    assert {k: tuple(v.shape) for k, v in pruned.state_dict().items()} == shapes
    return pruned


def _p(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) * 0.3)


class FunctionalNet(nn.Module):
    """Every layer in its functional form, with parameters read as attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = _p(10, 6)
        self.c1, self.b1 = _p(16, 6, 3, 3), _p(16)
        self.bn_w, self.bn_b = _p(16), _p(16)
        self.register_buffer("bn_mean", torch.randn(16) * 0.1)
        self.register_buffer("bn_var", torch.rand(16) + 0.5)
        self.c2 = _p(16, 16, 3, 3)
        self.gn_w, self.gn_b = _p(16), _p(16)
        self.up, self.up_b = _p(16, 12, 2, 2), _p(12)
        self.c3 = _p(8, 12, 1, 1)
        self.lin, self.lin_b = _p(5, 8), _p(5)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = F.embedding(idx, self.emb).permute(0, 3, 1, 2)  # (b, 6, h, w)
        x = F.relu(F.conv2d(x, self.c1, self.b1, padding=1))
        x = F.batch_norm(x, self.bn_mean, self.bn_var, self.bn_w, self.bn_b, False, 0.1, 1e-5)
        x = F.silu(F.group_norm(F.conv2d(x, self.c2, padding=1), 4, self.gn_w, self.gn_b))
        x = F.relu(F.conv_transpose2d(x, self.up, self.up_b, stride=2))
        x = F.conv2d(x, self.c3).mean((2, 3))
        return F.linear(x, self.lin, self.lin_b)


IDX = torch.randint(0, 10, (2, 4, 4))


@pytest.mark.parametrize("capture", ["fx", "export", "core_aten"])
def test_functional_layers_are_prunable_and_exact(capture: str) -> None:
    torch.manual_seed(0)
    model = FunctionalNet().eval()
    if capture == "fx":
        gm = idap_fx.trace(model, IDX)
    else:
        program = torch.export.export(model, (IDX,))
        gm = from_exported(program.run_decompositions() if capture == "core_aten" else program)
    dg = idap_fx.analyze(gm)
    assert not dg.boundaries
    sizes = sorted((g.size, g.exact) for g in dg.prunable)
    # embedding 6, conv1 16 (with BN), conv2 16 as 4 GroupNorm groups, conv_transpose 12, conv3 8
    assert sizes == [(4, True), (6, True), (8, True), (12, True), (16, True)]
    pruned = _oracle(gm, random_plan(dg, 0.5, seed=1), IDX)
    assert pruned.state_dict()["gn_w"].shape == (8,)  # two whole groups of 4 removed


class TimmStyleBatchNormAct(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d``: a BatchNorm subclass whose forward calls ``F.batch_norm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return F.relu(x)


class Conv2dSubclass(nn.Conv2d):
    """A Conv subclass outside torch.nn (fx traces through it to ``torch.conv2d``), as torchvision's r3d_18."""


def test_traced_through_subclasses_behave_like_their_base_class() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        Conv2dSubclass(3, 8, 3, padding=1), TimmStyleBatchNormAct(8), Conv2dSubclass(8, 8, 3, groups=8),
        TimmStyleBatchNormAct(8), nn.Conv2d(8, 4, 1),
    ).eval()  # fmt: skip
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 8, 8)
    gm = idap_fx.trace(model, x)
    assert any(n.target is F.batch_norm for n in gm.graph.nodes)
    assert any(n.target is torch.conv2d for n in gm.graph.nodes)
    dg = idap_fx.analyze(gm)
    assert not dg.boundaries
    assert [(g.size, g.exact) for g in dg.prunable] == [(8, True)]  # depthwise: one group through both BNs
    _oracle(gm, random_plan(dg, 0.4), x)


def test_r3d_18_conv3d_subclass_is_prunable_and_exact() -> None:
    torch.manual_seed(0)
    model = torchvision.models.video.r3d_18(weights=None).eval()
    x = torch.randn(1, 3, 4, 16, 16)
    gm = idap_fx.trace(model, x)
    dg = idap_fx.analyze(gm)
    leaf = idap_fx.analyze(
        idap_fx.trace(model, x, leaf_modules=[torchvision.models.video.resnet.Conv3DSimple])
    )
    assert sorted(g.size for g in dg.prunable) == sorted(g.size for g in leaf.prunable)
    assert len(dg.prunable) == 12 and all(g.exact for g in dg.prunable)
    _oracle(gm, random_plan(dg, 0.3), x)


def test_conv_transpose_modules_prune_like_convs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.ConvTranspose2d(8, 6, 2, stride=2), nn.ReLU(),
        nn.ConvTranspose2d(6, 4, 3, padding=1),
    ).eval()  # fmt: skip
    x = torch.randn(2, 3, 8, 8)
    gm = idap_fx.trace(model, x)
    dg = idap_fx.analyze(gm)
    assert sorted(g.size for g in dg.prunable) == [6, 8]
    pruned = _oracle(gm, random_plan(dg, 0.5), x)
    assert pruned.get_submodule("2").in_channels == 4 and pruned.get_submodule("2").out_channels == 3


class GroupNormBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.silu(self.gn(self.conv(x))))


def test_group_norm_units_are_whole_groups() -> None:
    torch.manual_seed(0)
    model = GroupNormBlock().eval()
    with torch.no_grad():
        model.gn.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 6, 6)
    gm = idap_fx.trace(model, x)
    dg = idap_fx.analyze(gm)
    (group,) = dg.prunable
    assert (group.size, group.exact) == (4, True)
    base = int(group.units[0][0])  # channels 4k .. 4k + 3 of the conv form unit k
    assert [(u - base).tolist() for u in group.units] == [list(range(4 * k, 4 * k + 4)) for k in range(4)]
    pruned = _oracle(gm, {group.id: [0, 2]}, x)
    assert (pruned.gn.num_groups, pruned.gn.num_channels) == (2, 8)


def test_a_single_group_group_norm_stays_inexact() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(1, 8), nn.Conv2d(8, 2, 1)).eval()
    dg = idap_fx.analyze(idap_fx.trace(model, torch.randn(1, 3, 4, 4)))
    (group,) = dg.prunable
    assert (group.size, group.exact) == (8, False)


class Pointwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = torch.expm1(h.clamp(max=2.0)) + torch.minimum(h, torch.log1p(h.abs()))
        return self.b(torch.lerp(h, torch.atan2(h, h.exp()), 0.3))


def test_every_pointwise_aten_op_is_element_wise() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4)
    gm = from_exported(torch.export.export(Pointwise().eval(), (x,)))
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert {"aten.expm1.default", "aten.lerp.Scalar", "aten.atan2.default"} <= targets
    dg = idap_fx.analyze(gm)
    assert not dg.boundaries
    assert [g.size for g in dg.prunable] == [8]
    _oracle(gm, random_plan(dg, 0.4), x)


class HandRMSNorm(nn.Module):
    """RMSNorm the way Hugging Face's Llama family writes it (traced through: pow, mean, rsqrt, mul)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class RMSStream(nn.Module):
    """A pre-norm residual stream: every block reads the stream through an RMSNorm."""

    def __init__(self, norm: type[nn.Module], d: int = 16) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(8, d), nn.Linear(d, 5)
        self.norms = nn.ModuleList(norm(d) for _ in range(3))
        self.fc1 = nn.ModuleList(nn.Linear(d, 2 * d) for _ in range(2))
        self.fc2 = nn.ModuleList(nn.Linear(2 * d, d) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for n, a, b in zip(self.norms, self.fc1, self.fc2, strict=False):
            h = h + b(torch.relu(a(n(h))))
        return self.out(self.norms[2](h))


@pytest.mark.parametrize("norm", [HandRMSNorm, nn.RMSNorm], ids=["traced_through", "nn.RMSNorm"])
@pytest.mark.parametrize("capture", ["fx", "export"])
def test_rms_norm_stream_is_an_inexact_prunable_group(norm: type[nn.Module], capture: str) -> None:
    """The residual stream under RMSNorm is prunable but inexact (its statistic spans the channels), as under
    LayerNorm; it used to freeze ("mean over channels"). Pruning it gives the planned shapes and a model that
    runs; the MLP widths stay exact (prune == mask)."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8)
    model = RMSStream(norm).eval()
    gm = idap_fx.trace(model, x) if capture == "fx" else from_exported(torch.export.export(model, (x,)))
    dg = idap_fx.analyze(gm)
    stream = [g for g in dg.prunable if not g.exact]
    assert len(stream) == 1 and stream[0].size == 16, [(g.id, g.size, g.exact) for g in dg.prunable]
    reason = stream[0].inexact_reason
    assert "over channels" in reason or "statistics span the channels" in reason, reason
    mlp = {g.id: [0, 5, 9] for g in dg.prunable if g.exact}
    assert len(mlp) == 2
    _oracle(gm, mlp, x)
    plan = {stream[0].id: [1, 4, 11]}
    pruned = idap_fx.prune(gm, plan, dg)
    assert {k: tuple(v.shape) for k, v in pruned.state_dict().items()} == expected_param_shapes(
        gm, dg.expected_numel(plan)
    )
    with torch.no_grad():
        out = pruned(x)
    assert out.shape == (3, 4, 5) and torch.isfinite(out).all()
