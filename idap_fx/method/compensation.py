"""Retraining-free compensation of a pruning step: what a consumer's removed inputs carried moves into what stays.

For every conv (groups = 1) or linear layer that loses input channels:

* ``mean`` (FLAP's bias compensation): the removed channels' mean contribution ``W_r E[x_r]`` is
  added to the bias, so the layer's expected output is unchanged. Uses the scoring statistics
  already streamed.
* ``least_squares``: the removed channels are regressed on the kept ones over the calibration
  data (ridge, ``x_r ≈ A x_k + c`` per position), then ``W_r A`` is folded into the kept
  weights and ``W_r c`` into the bias: the consumer's output is the least-squares best that its
  kept inputs can reach (``mean`` is the case ``A = 0``). One extra pass over the calibration
  batches collects each consumer's input second moments (summed in float64, all-reduced under
  ``torch.distributed``); consumers are taken in chunks so the moments never exceed
  ``_GRAM_BUDGET`` numbers at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from idap_fx.errors import IdapError
from idap_fx.graph.dependency import DependencyGraph, Plan
from idap_fx.method.channel_stats import Site, batch_args
from idap_fx.method.collective import reducer

MODES = ("mean", "least_squares")
_GRAM_BUDGET = 1 << 23  # float64 numbers of input moments held at once (64 MiB)
RIDGE = 1e-2  # ridge, relative to the kept inputs' mean variance


@dataclass
class Consumer:
    """One layer whose input channels a plan removes: ``gone`` over its inputs, ``rows`` it keeps."""

    target: str
    gone: torch.Tensor
    rows: torch.Tensor | None
    mean: torch.Tensor
    channel_dim: int


def consumers(
    before: fx.GraphModule, dg: DependencyGraph, plan: Plan, sites: Sequence[Site] | None = None
) -> list[Consumer]:
    """The conv (groups = 1) / linear layers of ``before`` that lose input channels under ``plan``.

    With ``sites`` (``mean``): only layers whose input has streamed statistics, with their means.
    Without (``least_squares`` measures its own): every such layer, so the choice depends on the
    graph alone and replaying a step (``idap_fx.curve``) finds the same layers.
    """
    removed = dg.removed_elements(plan)
    nodes = {n.name: n for n in before.graph.nodes}
    site_of = {(s.node, s.slot.numel()): s for s in sites or () if not s.probe}
    found = []
    for m in dg.members:
        node = nodes.get(m.node)
        if m.role != "in" or m.dim != 1 or node is None or node.op != "call_module":
            continue
        mod = before.get_submodule(node.target)
        conv = isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        if not (conv or isinstance(mod, nn.Linear)) or getattr(mod, "groups", 1) != 1:
            continue
        arg = node.args[0]
        layout = dg.layouts.get(arg.name) if isinstance(arg, fx.Node) else None
        site = site_of.get((arg.name, mod.weight.shape[1])) if layout is not None else None
        channel_dim = 1 if conv else getattr(layout, "ndim", 0) - 1
        axis = None if layout is None else layout.axis_of(channel_dim)
        if (sites is not None and site is None) or axis is None or axis.ids.size != mod.weight.shape[1]:
            continue
        gone = torch.from_numpy(removed[axis.ids.ravel()])
        if not gone.any():
            continue
        out = next((o for o in dg.members if o.node == m.node and o.role == "out" and o.dim == 0), None)
        rows = None if out is None else torch.from_numpy(~removed[out.ids])
        mean = site.channel_mean() if site is not None else torch.zeros(0, dtype=torch.float64)
        found.append(Consumer(str(node.target), gone, rows, mean, channel_dim))
    return found


def compensate(
    before: fx.GraphModule,
    after: fx.GraphModule,
    dg: DependencyGraph,
    plan: Plan,
    sites: Sequence[Site],
    mode: str = "mean",
    batches: Sequence[Any] = (),
) -> int:
    """Fold removed inputs into the consumers of ``after`` (``mode`` as above); return layers changed.

    ``least_squares`` reads ``batches`` (the calibration batches), ``mean`` the ``sites``.
    """
    if mode == "least_squares":
        if not batches:
            raise IdapError("least-squares compensation needs calibration batches")
        found = consumers(before, dg, plan)
        for chunk in _chunks(before, found):
            for c, moments in zip(chunk, _moments(before, chunk, batches), strict=True):
                _fold(before, after, c, *_regression(c, *moments))
        return len(found)
    found = consumers(before, dg, plan, sites)
    for c in found:
        _fold(before, after, c, None, c.mean[c.gone])
    return len(found)


def _chunks(before: fx.GraphModule, found: list[Consumer]) -> list[list[Consumer]]:
    chunks: list[list[Consumer]] = [[]]
    held = 0
    for c in found:
        size = before.get_submodule(c.target).weight.shape[1] ** 2
        if chunks[-1] and held + size > _GRAM_BUDGET:
            chunks.append([])
            held = 0
        chunks[-1].append(c)
        held += size
    return [c for c in chunks if c]


def _moments(
    before: fx.GraphModule, chunk: list[Consumer], batches: Sequence[Any]
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(sum, Gram, count) of each consumer's input per position, over ``batches`` and all ranks."""
    acc = []
    hooks = []
    for c in chunk:
        width = before.get_submodule(c.target).weight.shape[1]
        acc.append([torch.zeros(width, dtype=torch.float64), torch.zeros(width, width, dtype=torch.float64),
                    torch.zeros(1, dtype=torch.float64)])  # fmt: skip

        def hook(
            _mod: nn.Module,
            args: tuple[Any, ...],
            slot: list[torch.Tensor] = acc[-1],
            dim: int = c.channel_dim,
        ) -> None:
            x = args[0].detach().movedim(dim, -1).reshape(-1, slot[0].numel()).float()
            slot[0] += x.sum(0, dtype=torch.float64)
            slot[1] += (x.T @ x).double()  # one batch in float32, the running sum in float64
            slot[2] += x.shape[0]

        hooks.append(before.get_submodule(c.target).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for batch in batches:
                before(*batch_args(batch))
    finally:
        for h in hooks:
            h.remove()
    for slot in acc:
        reducer().all_sum_(slot)
    return [(s, g, n) for s, g, n in acc]


def _regression(
    c: Consumer, total: torch.Tensor, gram: torch.Tensor, count: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge ``x_r ≈ A x_k + c``: (A of shape removed × kept, c of length removed)."""
    n = max(float(count), 1.0)
    mu = total / n
    cov = gram / n - torch.outer(mu, mu)
    k, r = ~c.gone, c.gone
    ckk = cov[k][:, k]
    lam = RIDGE * float(ckk.diagonal().mean()) if k.any() else 0.0
    ckk = ckk + max(lam, 1e-12) * torch.eye(ckk.shape[0], dtype=ckk.dtype)
    a = torch.linalg.solve(ckk, cov[k][:, r]).T
    return a, mu[r] - a @ mu[k]


def _fold(
    before: fx.GraphModule, after: fx.GraphModule, c: Consumer, a: torch.Tensor | None, offset: torch.Tensor
) -> None:
    """Kept weights += W_r A (``a`` None: unchanged), bias += W_r · offset (summed over the kernel), rows
    kept by ``after``."""
    w = before.get_submodule(c.target).weight.detach().double()
    w_r = w[:, c.gone]
    delta = (w_r.sum(dim=tuple(range(2, w.dim()))) if w.dim() > 2 else w_r) @ offset
    delta = delta if c.rows is None else delta[c.rows]
    target = after.get_submodule(c.target)
    with torch.no_grad():
        if a is not None:
            w_k = w[:, ~c.gone] + torch.einsum("or...,rk->ok...", w_r, a)
            target.weight.copy_((w_k if c.rows is None else w_k[c.rows]).to(target.weight.dtype))
        delta = delta.to(target.weight.dtype)
        if target.bias is None:
            target.bias = nn.Parameter(delta.clone())
        else:
            target.bias.add_(delta)
