"""Streamed layer divergence of stage-2 candidates (``idap_fx.rewrite.skip_candidates``), and projection fits.

``LayerStats`` is an ``fx.Interpreter`` (like ``idap_fx.method.channel_stats.ChannelStats``): residual
``E_x ‖F(x)‖/(‖x‖+ε)``, identity ``E_x ‖T_out − T_in‖/(‖T_in‖+ε)``, projection the relative
least-squares residual from running normal equations. Sums are all-reduced when distributed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx

from idap_fx.method.channel_stats import batch_args
from idap_fx.method.collective import reducer
from idap_fx.rewrite.skip_candidates import EPS, Candidate


class _Normal:
    """Running normal equations of Y ≈ [X 1] W (float64)."""

    def __init__(self) -> None:
        self.xtx: torch.Tensor | None = None
        self.xty: torch.Tensor | None = None
        self.yy = torch.zeros(1, dtype=torch.float64)

    def observe(self, x: torch.Tensor, y: torch.Tensor, channel_dim: int) -> None:
        xs = x.detach().movedim(channel_dim, -1).reshape(-1, x.shape[channel_dim]).double()
        ys = y.detach().movedim(channel_dim, -1).reshape(-1, y.shape[channel_dim]).double()
        xs = torch.cat([xs, torch.ones(xs.shape[0], 1, dtype=xs.dtype)], dim=1)
        xtx, xty = xs.T @ xs, xs.T @ ys
        self.xtx = xtx if self.xtx is None else self.xtx + xtx
        self.xty = xty if self.xty is None else self.xty + xty
        self.yy += ys.pow(2).sum()

    def state(self) -> list[torch.Tensor]:
        return [self.xtx, self.xty, self.yy]

    def solve(self) -> tuple[torch.Tensor, float]:
        """The least-squares W ((C_in + 1) × C_out, last row the bias) and the relative residual ‖Y−XW‖/‖Y‖."""
        n = self.xtx.shape[0]
        ridge = 1e-9 * float(self.xtx.diagonal().mean()) + 1e-12
        w = torch.linalg.solve(self.xtx + ridge * torch.eye(n, dtype=self.xtx.dtype), self.xty)
        res = float(self.yy - 2 * (w * self.xty).sum() + (w * (self.xtx @ w)).sum())
        yy = float(self.yy)
        return w, math.sqrt(max(res, 0.0) / yy) if yy > 0 else 0.0


class LayerStats(fx.Interpreter):
    """Run ``gm`` over calibration batches, streaming each candidate's divergence statistics."""

    def __init__(self, gm: fx.GraphModule, candidates: list[Candidate]) -> None:
        super().__init__(gm)
        self.candidates = candidates
        self.by_name = {n.name: n for n in gm.graph.nodes}
        self.at_entry: dict[str, list[Candidate]] = {}
        self.at_exit: dict[str, list[Candidate]] = {}
        for c in candidates:
            if c.kind != "residual":
                self.at_entry.setdefault(c.entry, []).append(c)
            self.at_exit.setdefault(c.exit, []).append(c)
        self.ratio = {c.key: torch.zeros(2, dtype=torch.float64) for c in candidates}
        self.normal = {c.key: _Normal() for c in candidates if c.kind == "projection"}
        self._held: dict[tuple[str, str, str], torch.Tensor] = {}

    def _ratio(self, key: tuple[str, str, str], num: torch.Tensor, den: torch.Tensor) -> None:
        b = num.shape[0]
        r = num.detach().double().reshape(b, -1).norm(dim=1) / (
            den.detach().double().reshape(b, -1).norm(dim=1) + EPS
        )
        self.ratio[key] += torch.stack([r.sum(), torch.tensor(float(b), dtype=torch.float64)])

    def run_node(self, n: fx.Node) -> Any:
        for c in self.at_exit.get(n.name, ()):  # before the add runs: an in-place add would overwrite F(x)
            if c.kind == "residual":
                self._ratio(c.key, self.env[self.by_name[c.nodes[-1]]], self.env[self.by_name[c.entry]])
        result = super().run_node(n)
        for c in self.at_entry.get(n.name, ()):  # a copy: an in-place op in the chain would change it
            self._held[c.key] = result.detach().clone()
        for c in self.at_exit.get(n.name, ()):
            if c.kind == "identity":
                x = self._held.pop(c.key)
                self._ratio(c.key, result - x, x)
            elif c.kind == "projection":
                self.normal[c.key].observe(self._held.pop(c.key), result, c.channel_dim)
        return result

    def collect(self, batches: Iterable[Any]) -> None:
        """Stream every batch through the graph, then all-reduce when distributed."""
        with torch.no_grad():
            for batch in batches:
                self.run(*batch_args(batch))
        reducer().all_sum_([*self.ratio.values(), *(t for nm in self.normal.values() for t in nm.state())])

    def scores(self) -> dict[tuple[str, str, str], float]:
        """Layer divergence per candidate key (lower = carries less flow = removed first)."""
        out = {}
        for c in self.candidates:
            if c.kind == "projection":
                out[c.key] = self.normal[c.key].solve()[1]
            else:
                total, count = self.ratio[c.key].tolist()
                out[c.key] = total / max(count, 1.0)
        return out

    def fits(self) -> dict[tuple[str, str, str], torch.Tensor]:
        """Least-squares weights ((C_in + 1) × C_out, last row the bias) per projection candidate."""
        return {key: nm.solve()[0] for key, nm in self.normal.items()}


def layer_scores(
    gm: fx.GraphModule, candidates: list[Candidate], calibration: Iterable[Any]
) -> tuple[dict[tuple[str, str, str], float], dict[tuple[str, str, str], torch.Tensor]]:
    """One pass over ``calibration``: each candidate's divergence, and the projections' fitted weights."""
    stats = LayerStats(gm, candidates)
    stats.collect(calibration)
    return stats.scores(), stats.fits()


__all__ = ["LayerStats", "layer_scores"]
