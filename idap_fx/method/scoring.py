"""Importance criteria: one score per pruning unit of every prunable group (low = pruned first).

All criteria share one interface, ``Importance.__call__(ctx) -> {group_id: scores}``,
so users can compare them on the same model and plan-selection code:

* ``divergence`` (default) — IDAP++ tensor-flow divergence (method notes §1): for unit
  ``j``, ``E_x‖A_j‖₂ / numel(A) · Σ_producers ‖W_j‖_F`` where ``A`` is the tensor the
  group's consumers read (after BN and activation) and the producers are the layers
  whose output rows make up the unit. Attention heads use the per-head output O^h
  (``attention_heads_output``) and the rows of W_Q, W_K, W_V of the head.
* ``l1`` — mean absolute weight of the unit's producer rows (magnitude pruning).
* ``bn_scale`` — |γ| of the BatchNorm that normalises the unit (network slimming);
  groups without a BatchNorm are never chosen (score +inf).
* ``taylor`` — first-order Taylor, (Σ w·∂L/∂w)² over the unit's producer rows; needs a
  ``loss_fn(model, batch) -> loss``.
* ``random`` — uniform, seeded (the baseline every criterion must beat).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import fx, nn

from idap_fx.errors import IdapError
from idap_fx.graph.dependency import DependencyGraph, Member
from idap_fx.method.channel_stats import ChannelStats, Site, UnitIndex, find_sites
from idap_fx.method.collective import reducer

Scores = dict[str, np.ndarray]


@dataclass
class ScoringContext:
    """What a criterion may look at; activation statistics are collected lazily, once."""

    gm: fx.GraphModule
    dg: DependencyGraph
    batches: Sequence[Any]
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None
    seed: int = 0
    units: UnitIndex = field(init=False)
    _sites: list[Site] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.units = UnitIndex(self.dg)

    @property
    def sites(self) -> list[Site]:
        """Streamed statistics at every consumption site (one pass over ``batches``)."""
        if self._sites is None:
            sites = find_sites(self.gm, self.dg, self.units)
            ChannelStats(self.gm, sites).collect(self.batches)
            self._sites = sites
        return self._sites

    def tensor(self, member: Member) -> torch.Tensor:
        """The parameter or buffer a member slices."""
        return (
            self.gm.get_parameter(member.param)
            if _is_param(self.gm, member.param)
            else self.gm.get_buffer(member.param)
        )

    def producer_members(self) -> list[Member]:
        """ "out" weight members (rank ≥ 2) of prunable units: the rows that make a unit."""
        return [m for m in self.dg.members if m.role == "out" and self.tensor(m).dim() >= 2]

    def per_unit(
        self, member: Member, values: torch.Tensor, reduce: str = "sum"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Reduce ``values`` (one per index along ``member.dim``) into (per global unit sum, count)."""
        pos = self.units.of_element[member.ids]
        keep = pos >= 0
        total = np.zeros(self.units.total)
        count = np.zeros(self.units.total)
        np.add.at(total, pos[keep], values.detach().double().numpy()[keep])
        np.add.at(count, pos[keep], 1)
        return total, count


def _is_param(gm: nn.Module, name: str) -> bool:
    try:
        gm.get_parameter(name)
    except AttributeError:
        return False
    return True


def _row_reduce(t: torch.Tensor, dim: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply ``fn`` over every dim except ``dim`` (one value per index along ``dim``)."""
    moved = t.detach().movedim(dim, 0).reshape(t.shape[dim], -1)
    return fn(moved)


class Importance(Protocol):
    """A pruning criterion: scores every unit of every prunable group."""

    name: str

    def __call__(self, ctx: ScoringContext) -> Scores: ...


class Divergence:
    """IDAP++ per-unit flow divergence (see the module docstring and docs/architecture.md)."""

    name = "divergence"

    def __call__(self, ctx: ScoringContext) -> Scores:
        act_sum = np.zeros(ctx.units.total)
        act_cnt = np.zeros(ctx.units.total)
        for site in ctx.sites:
            if site.samples == 0:
                continue
            act_sum[site.units] += site.mean_norm() / max(site.numel, 1)
            act_cnt[site.units] += 1
        act = np.divide(act_sum, act_cnt, out=np.full(ctx.units.total, np.nan), where=act_cnt > 0)
        if np.isnan(act).all():
            act[:] = 1.0
        else:  # units no consumer observes (rare): weight term only, at the median activation level
            act[np.isnan(act)] = np.nanmedian(act)
        weight = np.zeros(ctx.units.total)
        for m in ctx.producer_members():
            sq, _ = ctx.per_unit(m, _row_reduce(ctx.tensor(m), m.dim, lambda r: r.pow(2).sum(1)))
            weight += np.sqrt(sq)
        weight[weight == 0] = 1.0  # groups without producer weights (e.g. a BN-only chain): activation only
        return ctx.units.split(act * weight)


class L1:
    """Mean |w| over the unit's producer rows."""

    name = "l1"

    def __call__(self, ctx: ScoringContext) -> Scores:
        total = np.zeros(ctx.units.total)
        count = np.zeros(ctx.units.total)
        for m in ctx.producer_members():
            t = ctx.tensor(m)
            s, c = ctx.per_unit(m, _row_reduce(t, m.dim, lambda r: r.abs().sum(1)))
            total += s
            count += c * (t.numel() // t.shape[m.dim])
        return ctx.units.split(np.divide(total, count, out=np.zeros_like(total), where=count > 0))


class BNScale:
    """|γ| of the unit's BatchNorm (network slimming); +inf where no BatchNorm scales the unit."""

    name = "bn_scale"

    def __call__(self, ctx: ScoringContext) -> Scores:
        total = np.zeros(ctx.units.total)
        count = np.zeros(ctx.units.total)
        nodes = {n.name: n for n in ctx.gm.graph.nodes}
        for m in ctx.dg.members:
            node = nodes.get(m.node)
            if node is None or node.op != "call_module" or not m.param.endswith(".weight"):
                continue
            if isinstance(ctx.gm.get_submodule(node.target), nn.modules.batchnorm._BatchNorm):
                s, c = ctx.per_unit(m, ctx.tensor(m).abs())
                total += s
                count += c
        return ctx.units.split(np.divide(total, count, out=np.full_like(total, np.inf), where=count > 0))


class Taylor:
    """First-order Taylor importance of the unit's producer rows, (Σ w·g)², summed over batches."""

    name = "taylor"

    def __call__(self, ctx: ScoringContext) -> Scores:
        if ctx.loss_fn is None:
            raise IdapError("importance='taylor' needs loss_fn(model, batch) -> scalar loss")
        members = ctx.producer_members()
        total = np.zeros(ctx.units.total)
        was_training = ctx.gm.training
        held = {p: p.grad for p in ctx.gm.parameters()}  # optimize's first model shares the caller's
        ctx.gm.eval()
        try:
            for batch in ctx.batches:
                ctx.gm.zero_grad(set_to_none=True)
                loss = ctx.loss_fn(ctx.gm, batch)
                loss.backward()
                for m in members:
                    t = ctx.tensor(m)
                    if t.grad is None:
                        continue
                    prod = _row_reduce(t * t.grad, m.dim, lambda r: r.double().sum(1))
                    s, _ = ctx.per_unit(m, prod)
                    total += s**2
        finally:
            for p, grad in held.items():
                p.grad = grad
            ctx.gm.train(was_training)
        return ctx.units.split(np.asarray(reducer().all_sum(total.tolist())))


class RandomImportance:
    """Uniform random scores (seeded)."""

    name = "random"

    def __call__(self, ctx: ScoringContext) -> Scores:
        return ctx.units.split(np.random.default_rng(ctx.seed).random(ctx.units.total))


CRITERIA: dict[str, type] = {c.name: c for c in (Divergence, L1, BNScale, Taylor, RandomImportance)}


def get_importance(criterion: str | Importance) -> Importance:
    """A criterion by name (``divergence``, ``l1``, ``bn_scale``, ``taylor``, ``random``) or as given."""
    if isinstance(criterion, str):
        try:
            return CRITERIA[criterion]()
        except KeyError:
            raise IdapError(f"unknown importance {criterion!r}; choose one of {sorted(CRITERIA)}") from None
    return criterion


def score(
    gm: fx.GraphModule,
    dg: DependencyGraph,
    batches: Sequence[Any],
    criterion: str | Importance = "divergence",
    **kwargs: Any,
) -> Scores:
    """Scores of every unit of every prunable group of ``gm`` (``{group_id: array of size group.size}``)."""
    return get_importance(criterion)(ScoringContext(gm, dg, batches, **kwargs))


__all__ = ["CRITERIA", "Importance", "Scores", "ScoringContext", "get_importance", "score"]
