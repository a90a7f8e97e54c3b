"""Ops research code writes around its layers: weight standardisation (``F.batch_norm`` on a weight,
``reshape_as``), channels-last windows (``F.pad`` with zero channel padding, ``roll``, a ``view`` whose
channel size is read off the block input), ``repeat`` / ``tile``. Each keeps its channels prunable where
pruning stays exact (prune == mask oracle) and freezes or marks inexact where it does not.
"""

from __future__ import annotations

import tempfile

import pytest
import torch
import torch.nn.functional as F
from helpers import MultiQueryHeads, random_plan, rel_err
from torch import nn

import idap_fx
from idap_fx.capture.torch_export import from_exported


def _capture(model: nn.Module, x: torch.Tensor, capture: str) -> torch.fx.GraphModule:
    if capture == "fx":
        return idap_fx.trace(model, x)
    return from_exported(torch.export.export(model, (x,)))


def _group(dg: idap_fx.DependencyGraph, param: str, dim: int) -> idap_fx.graph.dependency.Group:
    (group,) = [g for g in dg.groups if any(m.param == param and m.dim == dim for m in g.members)]
    return group


def _exact_oracle(gm: torch.fx.GraphModule, dg: idap_fx.DependencyGraph, x: torch.Tensor) -> None:
    """A random plan over the exact groups: prune == mask, and the output changes."""
    exact = {g.id for g in dg.prunable if g.exact}
    plan = {k: v for k, v in random_plan(dg, 0.4, seed=3).items() if k in exact}
    assert plan
    pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
    with torch.no_grad():
        assert rel_err(pruned(x), masked(x)) <= 1e-5
        assert rel_err(pruned(x), gm(x)) > 1e-3


class StdConv(nn.Conv2d):
    """timm's ``StdConv2d`` / nfnet's ``ScaledStdConv2d``: the weight standardised per output channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, eps=1e-6)
        return F.conv2d(x, w.reshape_as(self.weight), self.bias, padding=self.padding)


class StdConvNet(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.c1, self.c2 = StdConv(3, 8, k, padding=k // 2), StdConv(8, 6, k, padding=k // 2)
        self.bn, self.head = nn.BatchNorm2d(8), nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.c2(F.relu(self.bn(self.c1(x))))).mean((2, 3)))


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("capture", ["fx", "export"])
def test_weight_standardisation_makes_input_channels_inexact(capture: str, k: int) -> None:
    """Standardising over (in, kh, kw) ties each output row's statistics to every input channel: removing
    an input channel of ``c2`` changes its weights' mean and variance (inexact: nfnet's 1x1 convs were
    called exact and pruned wrongly before); removing an output channel of ``c2`` removes a whole
    standardised row (exact, checked by the oracle)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm = _capture(StdConvNet(k).eval(), x, capture)
    dg = idap_fx.analyze(gm)
    inner = _group(dg, "c1.weight", 0)
    if k == 1:
        assert inner.prunable and not inner.exact and "statistics" in (inner.inexact_reason or "")
    else:  # in x kh x kw merge into one dim beside the kernel's own dims: frozen
        assert not (inner.prunable and inner.exact)
    outer = _group(dg, "c2.weight", 0)
    assert outer.prunable and outer.exact and outer.size == 6
    _exact_oracle(gm, dg, x)


class LevitStyle(nn.Module):
    """LeViT's ``bn(x.flatten(0, 1)).reshape_as(x)``: batch norm of tokens, back to the token layout."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn, self.out = nn.Linear(5, 12), nn.BatchNorm1d(12), nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return self.out(self.bn(y.flatten(0, 1)).reshape_as(y)).sum(1)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_reshape_as_follows_the_other_tensors_channels(capture: str) -> None:
    torch.manual_seed(0)
    model = LevitStyle().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
    x = torch.randn(2, 7, 5)
    gm = _capture(model, x, capture)
    dg = idap_fx.analyze(gm)
    group = _group(dg, "fc.weight", 0)
    assert group.prunable and group.exact and group.size == 12
    _exact_oracle(gm, dg, x)


class RotateEveryTwo(nn.Module):
    """timm EVA's interleaved rotary: ``stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)`` on
    heads x head_dim; the reshape's whole target shape is read off ``x`` ("shape set from another
    tensor" froze the heads), and follows ``x``'s heads after pruning as ``reshape_as`` does."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.out = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 4, 2).transpose(1, 2)
        rot = torch.stack([-q[..., 1::2], q[..., ::2]], -1).reshape(q.shape)
        return self.out((q + rot * 0.5).transpose(1, 2).reshape(b, t, -1))


def test_reshape_to_another_tensors_whole_shape_follows_its_heads() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    gm = idap_fx.trace(RotateEveryTwo().eval(), x)
    dg = idap_fx.analyze(gm)
    heads = _group(dg, "q.weight", 0)
    assert heads.prunable and heads.exact and heads.size == 4, heads.frozen_reason
    _exact_oracle(gm, dg, x)


def test_reshape_as_a_tensor_without_those_channels_freezes() -> None:
    class Mismatch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(5, 12)
            self.register_buffer("template", torch.zeros(2, 12))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x).reshape_as(self.template) * 2  # a fixed 12: pruning would break the reshape

    dg = idap_fx.analyze(idap_fx.trace(Mismatch().eval(), torch.randn(2, 5)))
    assert not _group(dg, "fc.weight", 0).prunable


class ChannelsLastWindow(nn.Module):
    """Swin v2 CR's block: channels-last (B, H, W, C), padded on H / W only, shifted by ``roll``, split
    into windows and put back with a ``view`` whose ``C`` is read off the block input."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.proj, self.head = nn.Conv2d(3, 8, 1), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).permute(0, 2, 3, 1)  # B, H, W, C
        B, H, W, C = x.shape
        y = F.pad(x, (0, 0, 0, 2, 0, 2))  # W and H padded; C untouched
        y = torch.roll(y, shifts=(-1, -1), dims=(1, 2))
        win = y.reshape(-1, 4, 4, C)
        win = self.proj(win)
        y = win.view(-1, 4, 4, C).reshape(B, H + 2, W + 2, C)
        y = torch.roll(y, shifts=(1, 1), dims=(1, 2))[:, :H, :W, :]
        return self.head((x + y).mean((1, 2)))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_channels_last_windows_keep_the_stream_prunable(capture: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    gm = _capture(ChannelsLastWindow().eval(), x, capture)
    dg = idap_fx.analyze(gm)
    group = _group(dg, "embed.weight", 0)
    assert group.prunable and group.exact, group.frozen_reason
    assert _group(dg, "proj.weight", 0) is group  # the residual add and the view's C couple them
    _exact_oracle(gm, dg, x)


@pytest.mark.parametrize(
    ("op", "reason"),
    [
        (lambda y: F.pad(y, (0, 1)), "pooled/resized"),  # pads the channel dim (last, channels-last)
        (lambda y: torch.roll(y, 1, dims=3), "roll moves channels"),
        (lambda y: torch.roll(y, 1), "roll moves channels"),  # no dims: the flattened tensor
        (lambda y: torch.flip(y, dims=(-1,)), "flip moves channels"),
        (lambda y: y.repeat(1, 1, 1, 2), "repeats a channel dim"),
    ],
    ids=["pad", "roll", "roll-flat", "flip", "repeat"],
)
def test_moving_or_copying_channels_freezes_them(op, reason: str) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv2d(3, 8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return op(self.embed(x).permute(0, 2, 3, 1)).sum()

    dg = idap_fx.analyze(idap_fx.trace(Net().eval(), torch.randn(1, 3, 4, 4)))
    group = _group(dg, "embed.weight", 0)
    assert not group.prunable and reason in (group.frozen_reason or "")


class RepeatNet(nn.Module):
    """XCiT's positional encoding: ``pos.repeat(B, 1, 1, 1)`` added to the stream, and ``tile`` of a
    feature map along H; the channel dims are copied once."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Conv2d(4, 8, 1)
        self.embed, self.head = nn.Conv2d(3, 8, 1), nn.Linear(8, 4)
        self.register_buffer("grid", torch.randn(1, 4, 4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = self.pos(self.grid).repeat(x.shape[0], 1, 1, 1)
        y = torch.tile(self.embed(x) + pos, (1, 2, 1))  # (C, H, W) repeats -> (1, 1, 2, 1)
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_repeat_on_other_dims_keeps_channels_exact(capture: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    gm = _capture(RepeatNet().eval(), x, capture)
    dg = idap_fx.analyze(gm)
    group = _group(dg, "embed.weight", 0)
    assert group.prunable and group.exact and _group(dg, "pos.weight", 0) is group
    _exact_oracle(gm, dg, x)


class PointwiseMix(nn.Module):
    """CSATv2's ``torch.addcmul`` and friends: element-wise across their inputs (fx spelling)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.head = nn.Linear(5, 8), nn.Linear(5, 8), nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c = self.a(x), self.b(x), self.c(x)
        y = torch.addcmul(a, b, c, value=0.5) + a.addcdiv(b, c.abs() + 1)
        y = torch.lerp(y, b, 0.3) + torch.log(c.abs() + 1) + (b.abs() + 1).reciprocal()
        return self.head(y)


def test_addcmul_family_is_element_wise() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 5)
    gm = idap_fx.trace(PointwiseMix().eval(), x)
    dg = idap_fx.analyze(gm)
    assert not dg.boundaries
    group = _group(dg, "a.weight", 0)
    assert group.prunable and group.exact and _group(dg, "c.weight", 0) is group
    _exact_oracle(gm, dg, x)


class FusedHeads(nn.Module):
    """Falcon's new decoder: a fused projection viewed as (B, T, heads, 3, hd) and read with literal lists
    (``qkv[:, :, :, [1]]``), plus a weight used transposed (``x @ w.T``)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 4 * 3 * 2)
        self.w = nn.Parameter(torch.randn(3, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.qkv(x).view(b, t, 4, 3, 2)
        q, kv = qkv[:, :, :, [0]], qkv[:, :, :, [1, 2]]
        y = (q * kv.sum(3, keepdim=True)).squeeze(3).reshape(b, t, 8)
        return y @ self.w.T  # the heads are contracted with w's input dim


def test_literal_list_index_and_weight_transpose_keep_heads_exact() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    gm = idap_fx.trace(FusedHeads().eval(), x)
    dg = idap_fx.analyze(gm)
    assert not dg.boundaries
    heads = _group(dg, "qkv.weight", 0)
    assert heads.prunable and heads.exact and heads.size == 4
    _exact_oracle(gm, dg, x)


class MatmulLayers(nn.Module):
    """Falcon's linears (``x @ self.weight.T``, no layer op) around a grouped-query attention whose key and
    value heads are copied to the query's shape with ``broadcast_to(k, q.shape)``."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Parameter(torch.randn(2 * (2 + 2) * 4, 8) / 3)  # 2 KV heads, 2 query heads each, hd 4
        self.out = nn.Parameter(torch.randn(8, 16) / 4)
        self.up, self.down = nn.Parameter(torch.randn(12, 8) / 3), nn.Parameter(torch.randn(8, 12) / 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = (x @ self.qkv.T).view(b, t, 2, 4, 4)  # (KV heads, 2 query + key + value, head_dim)
        q, k, v = qkv[:, :, :, :-2], qkv[:, :, :, [-2]], qkv[:, :, :, [-1]]
        k, v = torch.broadcast_to(k, q.shape), torch.broadcast_to(v, q.shape)
        q, k, v = (z.flatten(2, 3).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)
        h = x + att @ self.out.T
        return h + F.gelu(h @ self.up.t()) @ self.down.T


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_matmul_with_a_weight_is_a_layer_and_broadcast_to_keeps_kv_heads(capture: str) -> None:
    """The weights were "used by no channel-aware op" and ``broadcast_to`` had no rule: nothing was prunable."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    gm = _capture(MatmulLayers().eval(), x, capture)
    dg = idap_fx.analyze(gm)
    assert not dg.boundaries
    heads, mlp = _group(dg, "qkv", 0), _group(dg, "up", 0)
    assert heads.prunable and heads.exact and heads.size == 2, heads.frozen_reason  # a unit: a KV head
    assert mlp.prunable and mlp.exact and mlp.size == 12 and _group(dg, "down", 1) is mlp
    assert _group(dg, "out", 1) is heads
    plan = {heads.id: [0], mlp.id: [1, 5, 7]}
    pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
    assert pruned.state_dict()["qkv"].shape == (16, 8) and pruned.state_dict()["down"].shape == (8, 9)
    with torch.no_grad():
        assert rel_err(pruned(x), masked(x)) <= 1e-5 and rel_err(pruned(x), gm(x)) > 1e-3


class MergedBatchHeads(nn.Module):
    """Bloom's attention layout: a fused (heads, 3, head_dim) projection read by integer index (``aten.select``
    once exported), heads merged into the batch dim, a per-head bias added by ``baddbmm``, ``bmm`` after."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(8, 4 * 3 * 2), nn.Linear(8, 8)
        self.bias = nn.Parameter(torch.randn(4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        fused = self.qkv(x).view(b, t, 4, 3, 2)
        q, k, v = (fused[..., i, :].transpose(1, 2).reshape(b * 4, t, 2) for i in range(3))
        bias = self.bias[None].expand(b, 4, 1, t).reshape(b * 4, 1, t)
        probs = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=0.5).softmax(-1)
        att = torch.bmm(probs, v).view(b, 4, t, 2).transpose(1, 2).reshape(b, t, 8)
        return self.out(att)


class FloorDivHeads(MergedBatchHeads):
    """Heads merged into the batch as ``b * 4`` and split back with ``o.size(0) // 4`` (older research code)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        fused = self.qkv(x).view(b, t, 4, 3, 2)
        q, k, v = (fused[..., i, :].transpose(1, 2).reshape(b * 4, t, 2) for i in range(3))
        o = torch.bmm(torch.bmm(q, k.transpose(1, 2)).softmax(-1), v)
        return self.out(o.view(o.size(0) // 4, 4, t, 2).transpose(1, 2).reshape(b, t, 8))


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("module", [MergedBatchHeads, FloorDivHeads])
def test_heads_merged_into_the_batch_stay_exact(capture: str, module: type[nn.Module]) -> None:
    """``aten.select`` on a fixed sub-dim keeps the heads (it froze them: "selects one channel"), and
    ``baddbmm`` couples its bias with the product's heads. On fx the merged size is computed as ``b * 4``
    and split back with ``size(0) // 4``: pruning rewrites the literal head count (it froze the heads, and
    ``// 4`` went stale: "shape '[1, 2, 5, 2]' is invalid"); the pruned model then runs at any batch."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    gm = _capture(module().eval(), x, capture)
    dg = idap_fx.analyze(gm)
    assert not dg.boundaries
    heads = _group(dg, "qkv.weight", 0)
    assert heads.prunable and heads.exact and heads.size == 4, heads.frozen_reason
    if module is MergedBatchHeads:
        assert _group(dg, "bias", 0) is heads
    _exact_oracle(gm, dg, x)
    if capture == "fx":
        pruned = idap_fx.prune(gm, {heads.id: [1, 2]}, dg)
        wide = torch.randn(3, 5, 8)
        with torch.no_grad():
            assert rel_err(pruned(wide), torch.cat([pruned(row[None]) for row in wide])) <= 1e-5


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("pick", [(4, 5), (-2, -1)])
def test_query_heads_go_while_the_one_key_value_head_stays(capture: str, pick: tuple[int, int]) -> None:
    """The single key / value head, broadcast against the query heads, froze them all ("a one-channel
    tensor is broadcast against channels"), and the list index froze the fused projection ("indexes
    into channels"). Now the key / value slots are pinned, each query head is a unit, and the listed
    positions are renumbered after pruning (absolute ones went stale: the wrong slot was read)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    gm = _capture(MultiQueryHeads(pick).eval(), x, capture)
    dg = idap_fx.analyze(gm)
    heads = _group(dg, "qkv.weight", 0)
    assert heads.prunable and heads.exact and heads.size == 4, heads.frozen_reason
    assert "broadcast against many" in (heads.pinned_reason or "")
    assert _group(dg, "out.weight", 1) is heads
    for plan in ({heads.id: [0, 2]}, {heads.id: [1, 2, 3]}):
        pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
        kept = 4 - len(plan[heads.id])
        assert pruned.state_dict()["qkv.weight"].shape == ((kept + 2) * 2, 8)
        with torch.no_grad():
            assert rel_err(pruned(x), masked(x)) <= 1e-5 and rel_err(pruned(x), gm(x)) > 1e-3
    with pytest.raises(idap_fx.PlanError, match="removes all 4 units"):
        idap_fx.prune(gm, {heads.id: [0, 1, 2, 3]}, dg)


def test_literal_list_index_on_a_channel_dim_is_renumbered() -> None:
    class Pick(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.head = nn.Linear(5, 8), nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.fc(x)[:, [6, 0, 2]])  # picked positions follow pruning

    torch.manual_seed(0)
    x = torch.randn(3, 5)
    gm = idap_fx.trace(Pick().eval(), x)
    dg = idap_fx.analyze(gm)
    group = _group(dg, "fc.weight", 0)
    assert group.prunable and group.exact and group.size == 8 and _group(dg, "head.weight", 1) is group
    pruned, masked = idap_fx.prune(gm, {group.id: [0, 1, 5]}, dg), idap_fx.mask(gm, {group.id: [0, 1, 5]}, dg)
    assert pruned.state_dict()["head.weight"].shape == (4, 2)
    with torch.no_grad():
        assert rel_err(pruned(x), masked(x)) <= 1e-5 and rel_err(pruned(x), gm(x)) > 1e-3


class SpatialGate(nn.Module):
    """CBAM-style spatial attention: a one-channel map gates every channel of the features."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.gate, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 1, 1), nn.Conv2d(8, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        return self.b(y * torch.sigmoid(self.gate(y)))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_one_channel_gate_leaves_the_features_prunable(capture: str) -> None:
    """The gate's one channel, broadcast against the features, froze them ("a one-channel tensor is
    broadcast against channels"); it is pinned now and the features' channels prune exactly."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 9)
    gm = _capture(SpatialGate().eval(), x, capture)
    dg = idap_fx.analyze(gm)
    features = _group(dg, "a.weight", 0)
    assert features.prunable and features.exact and features.size == 8, features.frozen_reason
    assert _group(dg, "gate.weight", 1) is features and _group(dg, "b.weight", 1) is features
    _exact_oracle(gm, dg, x)


class PickedKeyGroups(nn.Module):
    """A picked slot (size 1) of per-group keys broadcast against the query heads of each group: the key
    axis also runs along the groups, which the queries may shrink, so pinning it would break the product."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.kv, self.o = nn.Linear(8, 24), nn.Linear(8, 12), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 2, 2, 3, 2)[:, :, :, :, 1, :]
        k = self.kv(x).view(b, t, 2, 3, 2)[:, :, :, [1], :]
        return self.o((q * k).reshape(b, t, 8))


def test_a_broadcast_axis_that_shares_shrinking_labels_freezes() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    dg = idap_fx.analyze(idap_fx.trace(PickedKeyGroups().eval(), x))
    for param in ("q.weight", "kv.weight"):
        group = _group(dg, param, 0)
        assert not group.prunable and "broadcast against channels that may go" in group.frozen_reason


class FlatKeyValueHeads(nn.Module):
    """StarCoder's (GPTBigCode) multi-query attention: one fused projection gives the query heads and a
    head_dim-wide key and value with no heads dim; they broadcast against every query head."""

    def __init__(self) -> None:
        super().__init__()
        self.c_attn, self.out = nn.Linear(8, 8 + 2 * 2), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.c_attn(x).split((8, 2, 2), dim=-1)
        q = q.view(b, t, 4, 2).transpose(1, 2)
        att = (q @ k.unsqueeze(1).transpose(-1, -2)).softmax(-1) @ v.unsqueeze(1)
        return self.out(att.transpose(1, 2).reshape(b, t, 8))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_flat_key_read_by_every_query_head_is_pinned(capture: str) -> None:
    """The key's head_dim channels are contracted with the same positions of every query head: they
    froze the fused projection ("varies within the units (e.g. heads) of another input"). They are read
    within every unit, so they stay (pinned) and the query heads go one by one."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    gm = _capture(FlatKeyValueHeads().eval(), x, capture)
    dg = idap_fx.analyze(gm)
    heads = _group(dg, "c_attn.weight", 0)
    assert heads.prunable and heads.exact and heads.size == 4, heads.frozen_reason
    assert "read within every unit" in (heads.pinned_reason or "")
    for plan in ({heads.id: [1]}, {heads.id: [0, 2, 3]}):
        pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
        assert pruned.state_dict()["c_attn.weight"].shape == ((4 - len(plan[heads.id])) * 2 + 4, 8)
        with torch.no_grad():
            assert rel_err(pruned(x), masked(x)) <= 1e-5 and rel_err(pruned(x), gm(x)) > 1e-3


class NativeGQA(nn.Module):
    """Grouped-query attention left to ``F.scaled_dot_product_attention(..., enable_gqa=True)`` (4 query
    heads, 2 key / value heads; no ``repeat_kv`` in the graph): the rule declined on the mismatched heads."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (
            nn.Linear(16, 16),
            nn.Linear(16, 8),
            nn.Linear(16, 8),
            nn.Linear(16, 16),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 4, 4).transpose(1, 2)
        k, v = (p(x).view(b, t, 2, 4).transpose(1, 2) for p in (self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.o(y.transpose(1, 2).reshape(b, t, 16))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_sdpa_enable_gqa_keeps_a_key_value_head_with_its_query_heads(capture: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    gm = _capture(NativeGQA().eval(), x, capture)
    dg = idap_fx.analyze(gm)
    assert not dg.boundaries
    heads = _group(dg, "q.weight", 0)
    assert heads.prunable and heads.exact and heads.size == 2  # a key / value head with its 2 query heads
    assert _group(dg, "k.weight", 0) is heads and _group(dg, "v.weight", 0) is heads
    pruned, masked = idap_fx.prune(gm, {heads.id: [0]}, dg), idap_fx.mask(gm, {heads.id: [0]}, dg)
    assert pruned.state_dict()["q.weight"].shape == (8, 16) and pruned.state_dict()["k.weight"].shape == (
        4,
        16,
    )
    with torch.no_grad():
        assert rel_err(pruned(x), masked(x)) <= 1e-5 and rel_err(pruned(x), gm(x)) > 1e-3
    with tempfile.TemporaryDirectory() as d:  # the TorchScript exporter lacks enable_gqa: auto takes dynamo
        report = idap_fx.export_onnx(pruned, x, f"{d}/gqa.onnx", dynamic_batch=capture == "fx")
        assert report.exporter == "dynamo" and report.max_rel_error <= 1e-4
