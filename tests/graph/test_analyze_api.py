"""The contract of ``trace`` / ``analyze`` / ``DependencyGraph``: ids, sizes, members, the coupling graph."""

from __future__ import annotations

import pytest
import torch
import torchvision
from helpers import rel_err, state_hash
from torch import fx, nn
from torchvision.models.vision_transformer import VisionTransformer

import idap_fx


def _signature(dg: idap_fx.DependencyGraph) -> list[tuple]:
    """Everything about the groups that must not change between equivalent analyses."""
    return [
        (
            g.id,
            g.size,
            g.channels,
            g.prunable,
            g.exact,
            tuple((m.param, m.dim, m.role, m.offset, m.count) for m in g.members),
        )
        for g in dg.groups
    ]


def _members(g: idap_fx.ChannelGroup) -> set[tuple[str, int, str]]:
    return {(m.param, m.dim, m.role) for m in g.members}


def _assert_oracle(
    gm: fx.GraphModule, plan: dict, x: torch.Tensor, dg: idap_fx.DependencyGraph
) -> fx.GraphModule:
    pruned = idap_fx.prune(gm, plan, dg)
    with torch.no_grad():
        assert rel_err(pruned(x), idap_fx.mask(gm, plan, dg)(x)) <= 1e-5
    return pruned


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 32, 32)
    return model, x, idap_fx.trace(model, x)


def test_group_ids_stable_across_analyses_and_retracing(resnet18):
    model, x, gm = resnet18
    first = _signature(idap_fx.analyze(gm))
    assert first == _signature(idap_fx.analyze(gm))
    assert first == _signature(idap_fx.analyze(idap_fx.trace(model, x)))
    # Ids are node names: readable, and the same for a differently seeded copy of the architecture.
    torch.manual_seed(1)
    other = torchvision.models.resnet18(weights=None)
    assert first == _signature(idap_fx.analyze(idap_fx.trace(other, x)))
    assert [g.id for g in idap_fx.analyze(gm).prunable][:3] == ["conv1", "layer1_0_conv1", "layer1_1_conv1"]


def test_every_conv_output_channel_is_in_exactly_one_group(resnet18):
    _, _, gm = resnet18
    dg = idap_fx.analyze(gm)
    for name, mod in gm.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            width = mod.weight.shape[0]
            owners = [
                (g, m) for g in dg.groups for m in g.members if (m.param, m.dim) == (f"{name}.weight", 0)
            ]
            assert len(owners) == 1, name
            group, member = owners[0]
            assert (member.role, member.offset, member.count) == ("out", 0, width)
            assert group.channels % width == 0  # a whole number of tensors share these channels
    assert all(g.size >= 2 for g in dg.prunable)
    assert dg.group("layer1_0_conv1").size == 64
    assert dg.group("layer4_0_conv1").size == 512


def test_residual_add_couples_conv_outputs_into_one_group(resnet18):
    _, _, gm = resnet18
    dg = idap_fx.analyze(gm)
    stem = dg.group("conv1")
    outs = {p for p, d, r in _members(stem) if r == "out"}
    # The stem, and both residual branches of layer1 (added to it), produce the same 64 channels.
    assert {"conv1.weight", "layer1.0.conv2.weight", "layer1.1.conv2.weight"} <= outs
    assert ("layer2.0.conv1.weight", 1, "in") in _members(stem)
    assert ("layer2.0.downsample.0.weight", 1, "in") in _members(stem)
    assert stem.size == 64 and stem.channels == 3 * 64


def test_to_networkx_nodes_carry_groups_and_edges_carry_reasons(resnet18):
    _, _, gm = resnet18
    dg = idap_fx.analyze(gm)
    graph = dg.to_networkx()
    ids = {g.id for g in dg.groups}
    for _, data in graph.nodes(data=True):
        assert {"node", "label", "size", "group"} <= set(data)
    listed = {data["group"] for _, data in graph.nodes(data=True)}
    assert ids <= listed
    assert graph.number_of_edges() > 0
    node_names = {n.name for n in gm.graph.nodes}
    for _, _, data in graph.edges(data=True):
        assert data["reasons"] and data["reasons"] <= node_names
    by_node = {data["node"]: s for s, data in graph.nodes(data=True) if data["label"] == "out"}
    assert "add" in graph.edges[by_node["conv1"], by_node["layer1_0_conv2"]]["reasons"]
    graph.clear()  # a copy: the analysis keeps its own
    assert dg.to_networkx().number_of_edges() > 0


class _Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(10, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(torch.cat([self.a(x), self.b(x)], dim=1)))


def test_concat_members_carry_offsets():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm = idap_fx.trace(_Concat().eval(), x)
    dg = idap_fx.analyze(gm)
    a, b = dg.group("a"), dg.group("b")
    assert (a.size, b.size) == (4, 6)
    assert [(m.offset, m.count) for m in a.members if m.param == "c.weight"] == [(0, 4)]
    assert [(m.offset, m.count) for m in b.members if m.param == "c.weight"] == [(4, 6)]
    pruned = _assert_oracle(gm, {"a": [0, 3], "b": [5]}, x, dg)
    assert pruned.c.weight.shape == (5, 7, 1, 1)


class _Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.d = nn.Conv2d(8, 16, 3, padding=1, groups=8)  # depthwise, channel multiplier 2
        self.h = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(self.d(self.g(self.a(x))))


@pytest.mark.parametrize("unit", range(4))
def test_grouped_conv_units_stay_balanced(unit: int):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm = idap_fx.trace(_Grouped().eval(), x)
    dg = idap_fx.analyze(gm)
    into, out = dg.group("a"), dg.group("g")
    # One unit = the same in-group position in both groups of `g`: 8 channels, 4 units.
    assert (into.size, into.channels) == (4, 8)
    assert all(len(u) == 2 for u in into.units)
    # `g`'s outputs are tied to the depthwise conv's: one unit = 2 channels of g + 4 of d.
    assert out.size == 4
    pruned = _assert_oracle(gm, {"a": [unit], "g": [unit]}, x, dg)
    assert (pruned.g.in_channels, pruned.g.out_channels, pruned.g.groups) == (6, 6, 2)
    assert pruned.g.weight.shape == (6, 3, 3, 3)
    assert (pruned.d.in_channels, pruned.d.out_channels, pruned.d.groups) == (6, 12, 6)
    assert pruned.h.weight.shape == (4, 12, 1, 1)


def test_attention_heads_are_the_units_of_multihead_attention():
    torch.manual_seed(0)
    vit = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128
    )
    nn.init.normal_(vit.heads.head.weight, std=0.02)
    x = torch.randn(2, 3, 32, 32)
    gm = idap_fx.trace(vit.eval(), x)
    dg = idap_fx.analyze(gm)
    heads = dg.group("encoder_layers_encoder_layer_0_self_attention:heads")
    assert heads.prunable and heads.exact
    assert (heads.size, heads.channels) == (4, 64)  # 4 heads of 16 channels
    attn = "encoder.layers.encoder_layer_0.self_attention"
    assert {(m.param, m.dim, m.role, m.count) for m in heads.members} == {
        (f"{attn}.in_proj_weight", 0, "out", 192),  # q, k and v rows of every head
        (f"{attn}.in_proj_bias", 0, "out", 192),
        (f"{attn}.out_proj.weight", 1, "in", 64),
    }
    pruned = _assert_oracle(gm, {heads.id: [1, 3]}, x, dg)
    mha = pruned.get_submodule(attn)
    assert mha.num_heads == 2
    assert mha.in_proj_weight.shape == (96, 64)
    assert mha.out_proj.weight.shape == (64, 32)
    # The residual stream's width is a LayerNorm'd group: prunable, but not exact.
    stream = dg.group("conv_proj")
    assert stream.prunable and not stream.exact and "LayerNorm" in stream.inexact_reason


def test_trace_does_not_mutate_the_caller_model():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).train()
    before = state_hash(model)
    x = torch.randn(2, 3, 32, 32)
    gm = idap_fx.trace(model, x)
    assert model.training and not gm.training
    assert state_hash(model) == before  # BN running stats untouched by the shape run
    assert all(p is not q for p, q in zip(gm.parameters(), model.parameters(), strict=True))
    dg = idap_fx.analyze(gm)
    plan = {"conv1": [0, 1]}
    idap_fx.prune(gm, plan, dg)
    idap_fx.mask(gm, plan, dg)
    with torch.no_grad():
        gm.conv1.weight.zero_()
    assert state_hash(model) == before


def test_trace_accepts_an_existing_graph_module(resnet18):
    model, x, gm = resnet18
    again = idap_fx.trace(gm, x)
    assert again is not gm and isinstance(again, fx.GraphModule)
    assert all(p is not q for p, q in zip(again.parameters(), gm.parameters(), strict=True))
    assert _signature(idap_fx.analyze(again)) == _signature(idap_fx.analyze(gm))
    # A plain symbolic_trace result has no shapes; trace() records them.
    plain = fx.symbolic_trace(model)
    assert all("tensor_meta" not in n.meta for n in plain.graph.nodes)
    shaped = idap_fx.trace(plain, x)
    assert all("tensor_meta" in n.meta for n in shaped.graph.nodes if n.op != "output")
    assert _signature(idap_fx.analyze(shaped)) == _signature(idap_fx.analyze(gm))
    with torch.no_grad():
        assert torch.equal(shaped(x), model(x))


def test_analyze_records_shapes_when_given_example_inputs(resnet18):
    model, x, gm = resnet18
    plain = fx.symbolic_trace(model)
    with pytest.raises(idap_fx.AnalysisError, match="carry no shapes"):
        idap_fx.analyze(plain)
    assert _signature(idap_fx.analyze(plain, x)) == _signature(idap_fx.analyze(gm))


def test_expected_numel_and_removed_elements_follow_the_plan(resnet18):
    _, _, gm = resnet18
    dg = idap_fx.analyze(gm)
    plan = {"layer1_0_conv1": [0, 5, 7]}
    removed = dg.removed_elements(plan)
    assert removed.sum() == 3  # one channel per unit, one space in this group
    expected = dict(dg.expected_numel(plan))
    assert expected["layer1.0.conv1.weight"] == ((0, 61), (1, 64))
    assert expected["layer1.0.conv2.weight"] == ((0, 64), (1, 61))
    assert expected["layer1.0.bn1.running_var"] == ((0, 61),)
    assert idap_fx.prune(gm, plan, dg).get_submodule("layer1.0.conv2").in_channels == 61


def test_an_unknown_layer_with_nested_tuple_outputs_is_frozen_not_a_crash() -> None:
    """An LSTM (no rule) returns ``(out, (h, c))``; its inputs freeze and pruning the layers around it works."""

    class Rnn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc_in = nn.Linear(6, 8)
            self.rnn = nn.LSTM(8, 8, batch_first=True)
            self.fc_mid = nn.Linear(8, 12)
            self.fc_out = nn.Linear(12, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, (h, _) = self.rnn(self.fc_in(x))
            return self.fc_out(torch.relu(self.fc_mid(out + h[-1][:, None])))

    x = torch.randn(2, 5, 6)
    gm = idap_fx.trace(Rnn().eval(), x)
    dg = idap_fx.analyze(gm)
    (rnn_in,) = [g for g in dg.groups if any(m.param == "fc_in.weight" and m.dim == 0 for m in g.members)]
    (mid,) = [g for g in dg.groups if any(m.param == "fc_mid.weight" and m.dim == 0 for m in g.members)]
    assert not rnn_in.prunable and "LSTM" in (rnn_in.frozen_reason or "")
    assert mid.prunable and mid.exact
    plan = {mid.id: [0, 3, 5]}
    with torch.no_grad():
        assert rel_err(idap_fx.prune(gm, plan, dg)(x), idap_fx.mask(gm, plan, dg)(x)) <= 1e-5
