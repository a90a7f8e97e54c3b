"""Measured cost of a pruning unit: the MACs and parameters one unit of a group carries.

torch's FLOP counter runs once per graph node (``node_macs``, on the meta device when the
graph allows, else a real CPU forward); a unit's cost is its share of every node whose
channels it slices (``unit_costs``), so a unit of a 4×4 layer costs 1/196 of one at 56×56.
Used by ``idap_fx.method.allocate`` to rank units per unit of cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from idap_fx.graph.dependency import ChannelGroup


def _tensor(gm: fx.GraphModule, name: str) -> torch.Tensor:
    try:
        return gm.get_parameter(name)
    except AttributeError:
        return gm.get_buffer(name)


def _meta(value: Any) -> Any:
    return torch.empty_like(value, device="meta") if isinstance(value, torch.Tensor) else value


class _NodeMacs(fx.Interpreter):
    """Runs the graph once (on ``meta`` when ``meta``) and records each node's MACs."""

    def __init__(self, gm: fx.GraphModule, counter: FlopCounterMode, meta: bool) -> None:
        super().__init__(gm)
        self.counter, self.meta, self.macs = counter, meta, {}

    def fetch_attr(self, target: str) -> Any:
        value = super().fetch_attr(target)
        return _meta(value) if self.meta else value

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        mod = self.module.get_submodule(target)
        if not self.meta:
            return mod(*args, **kwargs)
        state = {k: _meta(v) for k, v in [*mod.named_parameters(), *mod.named_buffers()]}
        return functional_call(mod, state, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        before = self.counter.get_total_flops()
        out = super().run_node(n)
        self.macs[n.name] = (self.counter.get_total_flops() - before) // 2
        return out


def node_macs(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> dict[str, int]:
    """MACs of every node of ``gm`` on ``example_inputs`` (torch's FLOP counter, FLOPs / 2)."""
    for meta in (True, False):
        counter = FlopCounterMode(display=False)
        interp = _NodeMacs(gm, counter, meta)
        try:
            with torch.no_grad(), counter:
                interp.run(*[_meta(x) if meta else x for x in example_inputs])
            return interp.macs
        except Exception:  # graphs that build real tensors internally cannot run on meta
            if not meta:
                raise
    raise AssertionError("unreachable")


def unit_costs(
    gm: fx.GraphModule, groups: Sequence[ChannelGroup], example_inputs: Sequence[Any]
) -> dict[str, tuple[float, float]]:
    """(MACs, parameters) one unit of each group carries, measured on the current graph.

    A node's MACs are shared out by the fraction of its sliced dimension the group holds
    (a depthwise conv touched on two dims counts once); parameters are counted per slice.
    """
    macs = node_macs(gm, example_inputs)
    out = {}
    for g in groups:
        share: dict[str, float] = {}
        params = 0.0
        seen = set()
        for m in g.members:
            t = _tensor(gm, m.param)
            frac = m.count / max(t.shape[m.dim], 1)
            share[m.node] = max(share.get(m.node, 0.0), frac)
            if (m.param, m.dim, m.offset) not in seen:
                seen.add((m.param, m.dim, m.offset))
                params += t.numel() * frac
        unit_macs = sum(macs.get(node, 0) * f for node, f in share.items()) / max(g.size, 1)
        out[g.id] = (unit_macs, params / max(g.size, 1))
    return out


__all__ = ["node_macs", "unit_costs"]
