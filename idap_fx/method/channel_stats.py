"""Streamed per-unit activation statistics, measured where the channels are consumed.

``ChannelStats`` is an ``fx.Interpreter`` (like ``ShapeProp``): it runs the graph on
calibration batches and, at every *site* (a tensor that a prunable group's consumer
layer reads: a conv/linear input, a matmul operand, the per-head output inside an
attention module), adds running sums per pruning unit. Nothing is stored per batch, so
memory does not grow with the calibration set. Under ``torch.distributed`` the sums are
all-reduced, so every rank ends with the statistics of the whole data set.

Per site and unit ``u`` it keeps ``Σ_x ‖A_u(x)‖₂`` (the norm over every position of the
unit's channels in one sample: spatial positions, tokens, head dims) and the number of
samples, so ``E_x ‖A_u‖₂`` is exact; and per channel position the plain sum of the
activation, for retraining-free compensation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from idap_fx.graph.dependency import DependencyGraph
from idap_fx.graph.layout import Layout
from idap_fx.graph.modules import PrunedMultiheadAttention, additive_mask
from idap_fx.method.collective import reducer

_ATTENTION = (nn.MultiheadAttention, PrunedMultiheadAttention)


class UnitIndex:
    """Global numbering of the prunable groups' units: group ``g`` owns ``offset[g.id] + k``."""

    def __init__(self, dg: DependencyGraph) -> None:
        self.groups = dg.prunable
        self.offset: dict[str, int] = {}
        self.of_element = np.full(dg.n_elements, -1, dtype=np.int64)
        total = 0
        for g in self.groups:
            self.offset[g.id] = total
            for k, elems in enumerate(g.units):
                self.of_element[elems] = total + k
            total += g.size
        self.total = total

    def split(self, values: np.ndarray) -> dict[str, np.ndarray]:
        """Cut a per-unit array into one array per group id."""
        return {g.id: values[self.offset[g.id] : self.offset[g.id] + g.size] for g in self.groups}


class Site:
    """One observed tensor: a node's output (or an attention module's per-head output).

    ``unit_of_pos`` maps each position along ``dims`` (flattened) to a global unit or -1;
    sums are kept over the site's own units only (``units``), in float64.
    """

    def __init__(
        self, node: str, dims: tuple[int, ...], unit_of_pos: np.ndarray, probe: bool = False
    ) -> None:
        self.node, self.dims, self.probe = node, tuple(dims), probe
        self.units, local = np.unique(unit_of_pos, return_inverse=True)
        if self.units[0] < 0:  # slot 0 collects positions of no prunable unit
            self.units, local = self.units[1:], local - 1
        self.slot = torch.from_numpy(np.where(unit_of_pos < 0, len(self.units), local).astype(np.int64))
        self.norm_sum = torch.zeros(len(self.units) + 1, dtype=torch.float64)
        self.mean_sum = torch.zeros(len(unit_of_pos), dtype=torch.float64)
        self.samples = 0.0
        self.mean_count = 0.0
        self.numel = 0

    def observe(self, value: torch.Tensor) -> None:
        """Add one batch (dim 0 is the batch)."""
        a = value.detach().float()
        other = [d for d in range(1, a.dim()) if d not in self.dims]
        sq = (a.pow(2).sum(dim=other) if other else a.pow(2)).reshape(a.shape[0], -1)
        per_unit = torch.zeros(a.shape[0], self.norm_sum.numel(), dtype=torch.float32)
        per_unit.index_add_(1, self.slot, sq)
        self.norm_sum += per_unit.sqrt().double().sum(0)
        self.samples += a.shape[0]
        sums = a.sum(dim=[0, *other]) if other else a.sum(0)
        self.mean_sum += sums.reshape(-1).double()
        self.mean_count += a.numel() / max(1, sums.numel())
        self.numel = a[0].numel()

    def state(self) -> list[torch.Tensor]:
        """Every accumulator, for all-reduce."""
        return [
            self.norm_sum,
            self.mean_sum,
            torch.tensor([self.samples, self.mean_count], dtype=torch.float64),
        ]

    def load(self, tensors: list[torch.Tensor]) -> None:
        """Take accumulators back (after all-reduce)."""
        self.norm_sum, self.mean_sum = tensors[0], tensors[1]
        self.samples, self.mean_count = (float(v) for v in tensors[2])

    def mean_norm(self) -> np.ndarray:
        """E_x ‖A_u‖₂ for each of ``self.units``."""
        return (self.norm_sum[:-1] / max(self.samples, 1.0)).numpy()

    def channel_mean(self) -> torch.Tensor:
        """Mean activation per position along ``dims`` (for compensation)."""
        return self.mean_sum / max(self.mean_count, 1.0)


def _sites_for_layout(node: str, layout: Any, units: UnitIndex) -> list[Site]:
    if not isinstance(layout, Layout):
        return []
    out = []
    for axis in layout.axes:
        if 0 in axis.dims:
            continue
        pos = units.of_element[axis.ids.ravel()]
        if (pos >= 0).any():
            out.append(Site(node, axis.dims, pos))
    return out


def find_sites(gm: fx.GraphModule, dg: DependencyGraph, units: UnitIndex) -> list[Site]:
    """Every tensor a prunable group's consumer reads, plus attention modules' head outputs."""
    consumers = {m.node for m in dg.members if m.role == "in"} | {m.node for m in dg.input_masks}
    sites: dict[tuple[str, tuple[int, ...]], Site] = {}
    for node in gm.graph.nodes:  # graph order: every rank must all-reduce the sites in the same order
        if node.name not in consumers:
            continue
        name = node.name
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), _ATTENTION):
            member = next(m for m in dg.members if m.node == name and m.param.endswith("out_proj.weight"))
            pos = units.of_element[member.ids]
            if (pos >= 0).any():
                sites[(name, (-1,))] = Site(name, (2,), pos, probe=True)
        for arg in node.all_input_nodes:
            for site in _sites_for_layout(arg.name, dg.layouts.get(arg.name), units):
                sites.setdefault((site.node, site.dims), site)
    return list(sites.values())


def attention_heads_output(mod: nn.Module, args: Sequence[Any], kwargs: dict[str, Any]) -> torch.Tensor:
    """The concatenated per-head outputs softmax(QKᵀ/√d)V of an attention module, batch first.

    This is the tensor ``out_proj`` reads (O^h of the method notes, one slice per head).
    """
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")
    bound = dict(zip(names, args, strict=False)) | kwargs
    q, k, v = bound["query"], bound["key"], bound["value"]
    if not mod.batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    heads = mod.num_heads
    w_q, w_k, w_v = mod.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mod.in_proj_bias.chunk(3) if mod.in_proj_bias is not None else (None, None, None)
    q, k, v = F.linear(q, w_q, b_q), F.linear(k, w_k, b_k), F.linear(v, w_v, b_v)
    b, lq, ls = q.shape[0], q.shape[1], k.shape[1]
    q, k, v = (t.reshape(b, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    mask = additive_mask(
        bound.get("attn_mask"),
        bound.get("key_padding_mask"),
        q.dtype,
        b,
        lq,
        ls,
        bool(kwargs.get("is_causal")),
    )
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, lq, -1)


class ChannelStats(fx.Interpreter):
    """Run ``gm`` over calibration batches, streaming per-unit statistics at every site."""

    def __init__(self, gm: fx.GraphModule, sites: list[Site]) -> None:
        super().__init__(gm)
        self.by_node: dict[str, list[Site]] = {}
        for s in sites:
            self.by_node.setdefault(s.node, []).append(s)
        self.sites = sites

    def run_node(self, n: fx.Node) -> Any:
        sites = self.by_node.get(n.name, ())
        probes = [s for s in sites if s.probe]
        result = self._attention(n, probes) if probes else None
        if result is None:
            result = super().run_node(n)
        for site in sites:
            if not site.probe and isinstance(result, torch.Tensor):
                site.observe(result)
        return result

    def _attention(self, n: fx.Node, probes: list[Site]) -> Any:
        """Observe the per-head outputs; finish the module from them when it need not return weights."""
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        mod = self.module.get_submodule(n.target)
        heads = attention_heads_output(mod, args, kwargs)
        for site in probes:
            site.observe(heads)
        need_weights = kwargs.get("need_weights", args[4] if len(args) > 4 else True)
        if need_weights or mod.training:
            return None  # the module computes its weights (or dropout) itself
        out = mod.out_proj(heads)
        return (out if mod.batch_first else out.transpose(0, 1)), None

    def collect(self, batches: Iterable[Any]) -> None:
        """Stream every batch through the graph, then all-reduce when distributed."""
        with torch.no_grad():
            for batch in batches:
                self.run(*batch_args(batch))
        for site in self.sites:
            tensors = site.state()
            reducer().all_sum_(tensors)
            site.load(tensors)


def batch_args(batch: Any) -> tuple[Any, ...]:
    """A calibration batch as positional model inputs (a tensor, or a tuple/list of them)."""
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
