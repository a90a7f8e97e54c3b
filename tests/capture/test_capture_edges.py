"""Capture edge cases: shapes after a rewrite, zero-size slices, optional arguments, -inf masks.

- Exported graphs' ``split`` / ``chunk`` return lists: their recorded shapes must follow each
  rewrite (a second pruning step plans on them), checked against a fresh shape propagation.
- A zero-size slice concatenated back (partial rotary's empty pass-through) never crashes.
- ``forward(x, attn_mask=None)`` traces from ``x`` alone; an additive -inf mask buffer passes
  ``optimize``'s weight checks (NaN anywhere, and inf in parameters, stay errors).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import random_plan, rel_err
from torch import nn

import idap_fx
from idap_fx.capture.torch_export import from_exported
from idap_fx.capture.trace import record_shapes
from idap_fx.errors import IdapError, TraceError


class SplitNeck(nn.Module):
    """A detector-neck pattern: split a feature map, process one half, concatenate."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.branch = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(24, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.relu(self.stem(x)).chunk(2, dim=1)
        c, d = torch.relu(self.branch(b)).split([4, 4], dim=1)
        return self.head(torch.cat([a, b, c, d], dim=1))


def _shapes(gm: torch.fx.GraphModule) -> dict[str, object]:
    def one(meta: object) -> object:
        if hasattr(meta, "shape"):  # TensorMetadata (itself a named tuple)
            return tuple(meta.shape)
        return [one(m) for m in meta] if isinstance(meta, (list, tuple)) else None

    return {n.name: one(n.meta.get("tensor_meta")) for n in gm.graph.nodes if n.op != "output"}


def test_list_outputs_keep_their_recorded_shapes_through_two_steps() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm = from_exported(torch.export.export(SplitNeck().eval(), (x,)))
    assert any(isinstance(n.meta.get("tensor_meta"), list) for n in gm.graph.nodes)
    for step in range(2):
        dg = idap_fx.analyze(gm)
        plan = random_plan(dg, 0.25, seed=step)
        assert plan
        pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
        with torch.no_grad():
            assert rel_err(pruned(x), masked(x)) <= 1e-5
        recorded = _shapes(pruned)
        record_shapes(pruned, x)  # a fresh shape propagation must agree with what the rewrite recorded
        assert _shapes(pruned) == recorded
        gm = pruned


class FusedKV(nn.Module):
    """A fused key/value projection split by indexing a (2, heads, head_dim) axis."""

    def __init__(self) -> None:
        super().__init__()
        self.kv, self.out = nn.Linear(8, 16), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        kv = self.kv(x).reshape(b, n, 2, 2, 4).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        att = (k @ k.transpose(-2, -1)).softmax(-1) @ v
        return self.out(att.transpose(1, 2).reshape(b, n, 8))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_fused_kv_split_by_indexing_is_a_clear_boundary(capture: str) -> None:
    x = torch.randn(2, 5, 8)
    model = FusedKV().eval()
    gm = idap_fx.trace(model, x) if capture == "fx" else from_exported(torch.export.export(model, (x,)))
    dg = idap_fx.analyze(gm)
    kv = next(g for g in dg.groups if g.channels >= 16 and "kv" in g.id)
    assert not kv.prunable and ("channel" in kv.frozen_reason or "axis" in kv.frozen_reason)


class PartialRotary(nn.Module):
    """Phi-3's partial rotary with the rotary part the whole head: the pass-through slice is empty."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.o = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q(x)
        rot, passthrough = q[..., :16], q[..., 16:]
        return self.o(torch.cat((torch.tanh(rot), passthrough), dim=-1))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_zero_size_slices_do_not_crash_or_freeze(capture: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8)
    model = PartialRotary().eval()
    gm = idap_fx.trace(model, x) if capture == "fx" else from_exported(torch.export.export(model, (x,)))
    dg = idap_fx.analyze(gm)
    assert [g.size for g in dg.prunable] == [16]
    plan = random_plan(dg, 0.25)
    with torch.no_grad():
        assert rel_err(idap_fx.prune(gm, plan, dg)(x), idap_fx.mask(gm, plan, dg)(x)) <= 1e-5


class Masked(nn.Module):
    """``forward(x, attn_mask=None)`` and an additive causal mask buffer holding -inf."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 6)
        self.register_buffer("causal", torch.full((4, 4), float("-inf")).triu(1))

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, scale: float = 1.0
    ) -> torch.Tensor:
        scores = x @ x.transpose(-2, -1) + self.causal
        if attn_mask is not None:
            scores = scores + attn_mask
        return self.b(torch.relu(self.a(scores.softmax(-1) @ x))) * scale


def test_optional_arguments_are_not_required_inputs() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6)
    model = Masked().eval()
    gm = idap_fx.trace(model, x)
    (mask,) = [n for n in gm.graph.nodes if n.op == "placeholder" and n.name.startswith("attn_mask")]
    assert mask.args == (None,)  # optional, pinned to None: `if attn_mask is not None` is not traced
    assert all(u.target is torch.fx._symbolic_trace._assert_is_none for u in mask.users)
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) == 0.0
    assert [g.size for g in idap_fx.analyze(gm).prunable] == [16]
    with pytest.raises(TraceError, match=r"takes 1 to 3 input\(s\), example_inputs has 4"):
        idap_fx.trace(model, (x, x, x, x))


def test_an_inf_mask_buffer_passes_optimize_but_an_inf_parameter_does_not() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 4, 6)
    result = idap_fx.optimize(Masked().eval(), x, target_params=0.8, budget=None, quiet=True)
    assert result.report.target_reached
    bad = Masked().eval()
    with torch.no_grad():
        bad.a.bias[0] = math.inf
    with pytest.raises(IdapError, match=r"a\.bias contains NaN or Inf"):
        idap_fx.optimize(bad, x, target_params=0.8, budget=None, quiet=True)
    nan_buffer = Masked().eval()
    nan_buffer.causal[0, 0] = math.nan
    with pytest.raises(IdapError, match=r"causal contains NaN"):
        idap_fx.optimize(nan_buffer, x, target_params=0.8, budget=None, quiet=True)


class _DeviceSlopes(nn.Module):
    """Per-head slopes built on the input's device (``arange(..., device=x.device)``, as Bloom's ALiBi) and a
    position bias from ``arange(x.size(1))``, which depends on the input and must stay computed."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(8, 3 * 4 * 2), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 4, 2).permute(2, 0, 3, 1, 4).unbind(0)
        slopes = torch.pow(0.5, torch.arange(1, 5, device=x.device, dtype=x.dtype))
        distance = torch.arange(x.size(1), device=x.device, dtype=x.dtype)
        bias = slopes[:, None, None] * distance[None, None, :]
        att = (q @ k.transpose(-1, -2) - bias).softmax(-1)
        return self.out((att @ v).transpose(1, 2).reshape(b, t, 8))


def test_fx_capture_folds_constant_arange_but_not_one_sized_by_the_input() -> None:
    x = torch.randn(2, 5, 8)
    model = _DeviceSlopes().eval()
    gm = idap_fx.trace(model, x)
    aranges = [n for n in gm.graph.nodes if n.target is torch.arange]
    assert len(aranges) == 1 and any(
        isinstance(a, torch.fx.Node) for a in aranges[0].args
    )  # the x.size(1) one
    assert any(name.startswith("_folded_") for name, _ in gm.named_buffers())
    dg = idap_fx.analyze(gm)
    heads = [g for g in dg.prunable if g.exact and g.size == 4]
    assert len(heads) == 1, [(g.id, g.frozen_reason) for g in dg.groups]
    plan = {heads[0].id: [0, 3]}
    pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
    longer = torch.randn(2, 9, 8)
    with torch.no_grad():
        for inp in (x, longer):
            assert rel_err(pruned(inp), masked(inp)) <= 1e-5 and rel_err(pruned(inp), model(inp)) > 1e-3


class KeywordCalls(nn.Module):
    """Torch functions called with keyword operands, as research and Hugging Face code writes them."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.bn = (
            nn.Conv2d(3, 8, 3, padding=1),
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(16),
        )
        self.w, self.b = nn.Parameter(torch.randn(12, 16) / 4), nn.Parameter(torch.randn(12))
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat(tensors=[self.c1(x), self.c2(x)], dim=1)
        y = torch.flatten(input=F.adaptive_avg_pool2d(input=F.relu(self.bn(y)), output_size=1), start_dim=1)
        y = F.linear(input=y, weight=self.w, bias=self.b)
        y = torch.add(input=y, other=torch.mul(input=y, other=0.5))
        return self.head(torch.matmul(input=y.unsqueeze(1), other=torch.eye(12)).squeeze(1))


def test_keyword_operands_of_torch_functions_are_moved_to_their_positions() -> None:
    """``flatten(input=...)``, ``F.linear(input=..., weight=...)`` and ``matmul(input=..., other=...)`` left
    their rules declining (they read operands by position): every channel froze. Capture now rewrites such
    calls in positional form from torch's schemas; the groups are prunable and prune == mask."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm = idap_fx.trace(KeywordCalls().eval(), x)
    assert not any(n.kwargs.get("input") is not None for n in gm.graph.nodes if n.op == "call_function")
    dg = idap_fx.analyze(gm)
    assert not dg.boundaries
    assert {g.id for g in dg.prunable} >= {"c1", "w:dim0"}
    plan = {g: i for g, i in random_plan(dg, 0.4, seed=1).items() if dg.group(g).exact}
    with torch.no_grad():
        pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
        assert rel_err(pruned(x), masked(x)) <= 1e-5 and rel_err(pruned(x), gm(x)) > 1e-3
