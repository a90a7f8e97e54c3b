"""The op registry declares each op once: its propagation and the fixer that resyncs widths.

``surgery`` only runs the fixers it finds in the registry, so a layer with width
attributes and no fixer would keep stale ``out_channels``/``num_features`` after
pruning; ``ops`` must not import ``surgery`` (fixers see only the ``Rewrite`` protocol).
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import torch
from helpers import random_plan, rel_err
from torch import nn

import idap_fx
from idap_fx.graph import ops
from idap_fx.graph.ops import layers
from idap_fx.graph.ops.registry import (
    FUNCTION_RULES,
    METHOD_RULES,
    MODULE_RULES,
    TAG_RULES,
    lookup,
    module_fixer,
)

WIDTH_ARGS = {
    "in_channels",
    "out_channels",
    "in_features",
    "out_features",
    "num_features",
    "normalized_shape",
    "num_channels",
    "num_parameters",
    "embedding_dim",
    "embed_dim",
}


def test_every_fix_is_a_callable_or_none() -> None:
    rules = [*MODULE_RULES.values(), *FUNCTION_RULES.values(), *METHOD_RULES.values(), *TAG_RULES.values()]
    assert rules
    assert all(r.fix is None or (callable(r.fix) and not isinstance(r.fix, str)) for r in rules)


def test_every_layer_with_width_attributes_has_a_fixer() -> None:
    widths = {t for t in MODULE_RULES if WIDTH_ARGS & set(inspect.signature(t.__init__).parameters)}
    assert nn.Conv2d in widths and nn.LayerNorm in widths and nn.MultiheadAttention in widths
    assert sorted(t.__name__ for t in widths if MODULE_RULES[t].fix is None) == []


def test_ops_do_not_import_surgery() -> None:
    for path in Path(ops.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or "", *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n.startswith("idap_fx.rewrite.surgery") for n in names), path.name


class PlainConv(nn.Conv2d):
    """Inherits ``forward``: the conv rule and the conv fixer both apply."""


class CustomConv(nn.Conv2d):
    """Overrides ``forward``: a boundary, yet its width attributes are still resynced."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = PlainConv(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = PlainConv(8, 6, 3, padding=1)
        self.c3 = CustomConv(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c3(self.c2(torch.relu(self.bn(self.c1(x)))))


def test_subclasses_match_rules_and_fixers_like_their_parent() -> None:
    x = torch.randn(2, 3, 8, 8)
    gm = idap_fx.trace(Net().eval(), x, leaf_modules=(PlainConv, CustomConv))
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    assert lookup(nodes["c1"], gm) is MODULE_RULES[nn.Conv2d]
    assert lookup(nodes["c3"], gm) is None
    assert module_fixer(gm.c1) is module_fixer(gm.c3) is layers._fix_conv

    dg = idap_fx.analyze(gm)
    plan = random_plan(dg, 0.5)
    assert plan
    pruned = idap_fx.prune(gm, plan, dg)
    assert (pruned.c1.out_channels, pruned.bn.num_features, pruned.c2.in_channels) == (4, 4, 4)
    assert pruned.c2.out_channels == gm.c2.out_channels  # c3 is a boundary: its input stays
    with torch.no_grad():
        assert rel_err(pruned(x), idap_fx.mask(gm, plan, dg)(x)) <= 1e-5
