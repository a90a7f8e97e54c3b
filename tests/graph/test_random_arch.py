"""Generated architectures: random blocks, random plans; the analysis and the rewrite must agree.

A drawn spec (a list of blocks: residual adds, concats, splits/chunks, grouped and
depthwise convs, BatchNorm, SE gates, layer scales, ops the analyzer has no rule for)
becomes an ``nn.Module`` with tiny widths and 8x8 inputs. For every example: nothing
crashes, ``prune == mask`` on the plan, output shapes stay, frozen groups keep every
value, and each unknown op is reported in ``dg.boundaries`` with its channels frozen.
Examples per run follow the hypothesis profile (``IDAP_HYPOTHESIS_PROFILE=ci-long``: 1000).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from helpers import out_shapes, plan_is_exact, random_plan, rel_err
from hypothesis import given, note
from hypothesis import strategies as st
from torch import fx, nn

import idap_fx

ACTS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "hardswish": nn.Hardswish,
    "sigmoid": nn.Sigmoid,
}


def _mystery(x: torch.Tensor) -> torch.Tensor:
    """A channel permutation the analyzer has no rule for (kept opaque by ``fx.wrap``)."""
    return torch.roll(x, 1, dims=1) * 0.5


fx.wrap("_mystery")


class _Opaque(nn.Module):
    """The same permutation as a leaf module with a forward of its own: unknown code."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.roll(x, 1, dims=1) - 1.0


class ConvBN(nn.Module):
    """conv -> optional BatchNorm -> optional activation, 'same' padding."""

    def __init__(self, cin: int, cout: int, k: int, groups: int = 1, bn: bool = True, act: str | None = None):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=not bn)
        self.bn = nn.BatchNorm2d(cout) if bn else nn.Identity()
        self.act = ACTS[act]() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Residual(nn.Module):
    def __init__(self, c: int, mid: int, act: str, post_act: bool):
        super().__init__()
        self.body = nn.Sequential(ConvBN(c, mid, 3, act=act), ConvBN(mid, c, 1))
        self.post = nn.ReLU() if post_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(x + self.body(x))


class Concat(nn.Module):
    def __init__(self, c: int, ca: int, cb: int, keep_input: bool):
        super().__init__()
        self.a = ConvBN(c, ca, 1, act="relu")
        self.b = ConvBN(c, cb, 3)
        self.keep_input = keep_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [x, self.a(x), self.b(x)] if self.keep_input else [self.a(x), self.b(x)]
        return torch.cat(parts, dim=1)


class Split(nn.Module):
    """A conv whose output is cut in two (chunk / split / torch.split), each half with its own conv."""

    def __init__(self, c: int, first: int, second: int, how: str, merge: str):
        super().__init__()
        self.pre = ConvBN(c, first + second, 1, act="relu")
        self.sizes, self.how, self.merge = [first, second], how, merge
        self.left = ConvBN(first, 4, 3)
        self.right = ConvBN(second, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pre(x)
        if self.how == "chunk":
            u, v = y.chunk(2, dim=1)
        elif self.how == "method":
            u, v = y.split(self.sizes, dim=1)
        else:
            u, v = torch.split(y, self.sizes, dim=1)
        a, b = self.left(u), self.right(v)
        return a + b if self.merge == "add" else torch.cat([a, b], dim=1)


class SqueezeExcite(nn.Module):
    """x * sigmoid(fc(pool(x))), as torchvision writes it."""

    def __init__(self, c: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


class LayerScale(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma + 0.1


class Unknown(nn.Module):
    """A 1x1 conv feeding an op without a rule: a wrapped function or an opaque leaf module."""

    def __init__(self, c: int, cout: int, leaf: bool):
        super().__init__()
        self.pre = ConvBN(c, cout, 1)
        self.op = _Opaque() if leaf else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pre(x)
        return self.op(y) if self.op is not None else _mystery(y)


class Head(nn.Module):
    def __init__(self, c: int, kind: str, classes: int):
        super().__init__()
        self.kind = kind
        self.pool = nn.AvgPool2d(4)  # 8x8 -> 2x2 for the flatten heads
        self.fc = nn.Linear(c * 4 if kind in ("flatten", "view") else c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "pool":
            x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        elif self.kind == "mean":
            x = x.mean((2, 3))
        elif self.kind == "flatten":
            x = self.pool(x).flatten(1)
        else:
            x = self.pool(x)
            x = x.view(x.size(0), -1)
        return self.fc(x)


def build_block(spec: dict, c: int) -> tuple[nn.Module, int]:
    """The module for one block spec on ``c`` input channels, and its output width."""
    kind = spec["kind"]
    if kind == "conv":
        return ConvBN(c, spec["out"], spec["k"], bn=spec["bn"], act=spec["act"]), spec["out"]
    if kind == "grouped":
        g = spec["groups"] if c % spec["groups"] == 0 else 1
        return ConvBN(c, g * spec["per_group"], 3, groups=g, act=spec["act"]), g * spec["per_group"]
    if kind == "depthwise":
        return ConvBN(c, c * spec["mult"], 3, groups=c, act=spec["act"]), c * spec["mult"]
    if kind == "residual":
        return Residual(c, spec["mid"], spec["act"], spec["post_act"]), c
    if kind == "concat":
        out = spec["a"] + spec["b"] + (c if spec["keep_input"] else 0)
        return Concat(c, spec["a"], spec["b"], spec["keep_input"]), out
    if kind == "split":
        first = spec["first"]
        second = first if spec["how"] == "chunk" else spec["second"]
        return Split(c, first, second, spec["how"], spec["merge"]), 4 if spec["merge"] == "add" else 8
    if kind == "se":
        return SqueezeExcite(c, spec["squeeze"]), c
    if kind == "scale":
        return LayerScale(c), c
    if kind == "unknown":
        return Unknown(c, spec["out"], spec["leaf"]), spec["out"]
    raise ValueError(kind)


class Net(nn.Module):
    """stem -> blocks -> head, built from a drawn spec."""

    def __init__(self, spec: dict):
        super().__init__()
        c = spec["stem"]
        self.stem = ConvBN(3, c, 3, act="relu")
        blocks = []
        for b in spec["blocks"]:
            block, c = build_block(b, c)
            blocks.append(block)
        self.blocks = nn.Sequential(*blocks)
        self.head = Head(c, spec["head"], spec["classes"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


width = st.integers(2, 6)
act = st.sampled_from([None, *ACTS])
block_spec = st.one_of(
    st.fixed_dictionaries(
        {"kind": st.just("conv"), "out": width, "k": st.sampled_from([1, 3]), "bn": st.booleans(), "act": act}
    ),
    st.fixed_dictionaries(
        {
            "kind": st.just("grouped"),
            "groups": st.sampled_from([2, 3]),
            "per_group": st.integers(1, 3),
            "act": act,
        }
    ),
    st.fixed_dictionaries({"kind": st.just("depthwise"), "mult": st.integers(1, 2), "act": act}),
    st.fixed_dictionaries(
        {
            "kind": st.just("residual"),
            "mid": width,
            "act": st.sampled_from(list(ACTS)),
            "post_act": st.booleans(),
        }
    ),
    st.fixed_dictionaries({"kind": st.just("concat"), "a": width, "b": width, "keep_input": st.booleans()}),
    st.fixed_dictionaries(
        {
            "kind": st.just("split"),
            "first": width,
            "second": width,
            "how": st.sampled_from(["chunk", "method", "function"]),
            "merge": st.sampled_from(["add", "cat"]),
        }
    ),
    st.fixed_dictionaries({"kind": st.just("se"), "squeeze": st.integers(1, 3)}),
    st.fixed_dictionaries({"kind": st.just("scale")}),
    st.fixed_dictionaries({"kind": st.just("unknown"), "out": width, "leaf": st.booleans()}),
)
arch_spec = st.fixed_dictionaries(
    {
        "stem": st.integers(2, 6),
        "blocks": st.lists(block_spec, min_size=1, max_size=5),
        "head": st.sampled_from(["pool", "mean", "flatten", "view"]),
        "classes": st.integers(2, 5),
    }
)


def _randomize_batchnorm(model: nn.Module) -> None:
    """Non-trivial BN statistics, so a wrongly sliced BN changes the output."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)


def _expected_after_prune(
    gm: fx.GraphModule, dg: idap_fx.DependencyGraph, removed: np.ndarray, name: str
) -> torch.Tensor:
    """``name``'s original tensor with exactly the planned elements cut out of every member dim."""
    tensor = gm.get_parameter(name) if name in dict(gm.named_parameters()) else gm.get_buffer(name)
    cuts: dict[int, np.ndarray] = {}
    for m in dg.members:
        if m.param == name:
            cuts.setdefault(m.dim, m.ids)
    for dim, ids in cuts.items():
        tensor = tensor.index_select(dim, torch.as_tensor(np.nonzero(~removed[ids])[0]))
    return tensor.detach()


@given(spec=arch_spec, ratio=st.sampled_from([0.1, 0.3, 0.5, 0.9]), seed=st.integers(0, 2**16))
def test_random_architecture_prune_matches_mask(spec: dict, ratio: float, seed: int):
    torch.manual_seed(seed)
    model = Net(spec).eval()
    _randomize_batchnorm(model)
    x = torch.randn(2, 3, 8, 8)
    gm = idap_fx.trace(model, x, leaf_modules=[_Opaque])
    dg = idap_fx.analyze(gm)
    plan = random_plan(dg, ratio, seed)
    note(f"plan: {plan}")

    # No normalisation across channels is generated: every group is exact, the oracle applies.
    assert plan_is_exact(dg, plan)
    assert all(g.exact for g in dg.groups)
    pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
    with torch.no_grad():
        y, y_pruned, y_masked = gm(x), pruned(x), masked(x)
    assert out_shapes(y_pruned) == out_shapes(y)
    assert rel_err(y_pruned, y_masked) <= 1e-5

    # Frozen groups keep every value: tensors holding them equal the original minus the planned cuts.
    removed = dg.removed_elements(plan)
    state = pruned.state_dict()
    for g in dg.groups:
        if g.prunable:
            continue
        for m in g.members:
            ids = next(mm.ids for mm in dg.members if (mm.param, mm.dim) == (m.param, m.dim))
            assert not removed[ids[m.offset : m.offset + m.count]].any(), (
                f"{g.id}: {m.param} lost a frozen channel"
            )
            assert torch.equal(state[m.param], _expected_after_prune(gm, dg, removed, m.param)), m.param

    # Every op without a rule is a boundary, and the channels it reads are frozen, saying why.
    for i, block in enumerate(spec["blocks"]):
        if block["kind"] != "unknown":
            continue
        pre = next(n for n in gm.graph.nodes if n.target == f"blocks.{i}.pre.act")
        (op,) = pre.users
        assert op.target is _mystery or op.target == f"blocks.{i}.op"
        assert "no rule for" in dg.boundaries[op.name]
        feeding = [
            g for g in dg.groups for m in g.members if (m.param, m.dim) == (f"blocks.{i}.pre.conv.weight", 0)
        ]
        assert len(feeding) == 1 and not feeding[0].prunable
        assert op.name in feeding[0].frozen_reason
