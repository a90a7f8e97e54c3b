"""Allocation: given per-unit scores and costs, decide which units every group loses.

Stage 1 asks one question each step: which ``n`` units go next? The answer is built from

* **floors** — a group keeps at least ``min_keep`` of its ORIGINAL width (carried across
  the re-analysis of every step by its members' parameter names, ``OriginalWidths``), at
  least ``min_channels`` channels, and at least ``1 − max_prune_ratio`` (a float, or a dict
  of module name / module type name → ratio; a group takes the tightest cap of its members);
  a split part (a branch of a ``split`` / ``chunk``) is never emptied;
* **alignment** — kept channel counts are multiples of ``round_to`` (hardware widths);
  groups narrower than ``4·round_to`` align to the largest power-of-two fraction of
  ``round_to`` that still leaves them four widths. Alignment is part of the allocation:
  units leave in aligned *chunks*, so it can never empty a step;
* **an allocator** that ranks the chunks of all groups. Inside a group units always leave
  in score order (lowest first); the allocator only decides how far each group goes:

  - ``global``: the raw scores (the method's global ranking);
  - ``group``: scores divided by their group's mean (each unit against its own layer);
  - ``cost``: group-relative score per unit of measured cost (MACs, or parameters when only
    a parameter target is set): when scores tie, the units of expensive layers go first;
  - ``sensitivity``: per group, the label-free output deviation of masking its lowest-scored
    units (``idap_fx.mask``) at a few keep ratios on the calibration batches; chunks are
    ranked by the slope of the lower convex hull of deviation over MACs saved — the
    Lagrangian solution of "reach the MAC target with the least total deviation";
  - ``auto`` (the default) is not an allocator of its own: stage 1 runs once with each of
    ``AUTO_CANDIDATES`` and keeps the result that learns back best: the least held-out
    distillation loss after a short distillation probe (``recovery.recoverability``), on
    calibration data no allocator probed (``passes.prune_channels``). No single allocator won
    every model and target measured; one-shot deviation alone picked wrong where every
    candidate's output was destroyed (docs/architecture.md, "Allocation").

Unit cost is measured in ``idap_fx.method.unit_cost``: torch's FLOP counter per graph node times the
share of the node's channels the unit holds, so a unit of a 4×4 layer costs 1/196 of one at 56×56.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import fx

from idap_fx.errors import IdapError
from idap_fx.graph.dependency import ChannelGroup, DependencyGraph, Plan
from idap_fx.method.budget import deviation, reference_outputs
from idap_fx.method.unit_cost import unit_costs

ALLOCATORS = ("auto", "global", "group", "cost", "sensitivity")
AUTO_CANDIDATES = ("group", "cost", "sensitivity")
"""What ``auto`` runs and measures (``global`` is left out: it was last or near last in every cell measured)."""
Scores = dict[str, np.ndarray]


class OriginalWidths:
    """Each group's original unit count, found again after every re-analysis by parameter names.

    Recorded from the first analysis: a member whose (parameter, dim, role) is unique there
    identifies its group later, whatever the group's id or current width has become.
    """

    def __init__(self, dg: DependencyGraph) -> None:
        seen: dict[tuple[str, int, str], list[int]] = {}
        for g in dg.prunable:
            for m in g.members:
                seen.setdefault((m.param, m.dim, m.role), []).append(m.count)
        self._count = {k: v[0] for k, v in seen.items() if len(v) == 1}

    def channels(self, g: ChannelGroup) -> int:
        """Original channels of ``g`` (its current channels if no member is recognised)."""
        for m in g.members:
            key = (m.param, m.dim, m.role)
            if key in self._count and m.count:
                return round(self._count[key] * g.channels / m.count)
        return g.channels


@dataclass(frozen=True)
class Floors:
    """What a group must keep: ``min_keep`` of its original width, ``min_channels``, caps, alignment."""

    min_keep: float = 0.25
    min_channels: int = 1
    round_to: int = 1
    max_prune_ratio: float | Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.min_keep < 1:
            raise IdapError(f"min_keep must be a fraction in [0, 1), got {self.min_keep!r}")
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise IdapError(f"round_to must be a positive integer, got {self.round_to!r}")
        caps = self.max_prune_ratio
        values = caps.values() if isinstance(caps, Mapping) else ([] if caps is None else [caps])
        for v in values:
            if not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise IdapError(f"max_prune_ratio values must be fractions in [0, 1], got {v!r}")

    def cap(self, gm: fx.GraphModule, g: ChannelGroup) -> float:
        """The tightest ``max_prune_ratio`` among the modules of ``g`` (1.0: no cap)."""
        caps = self.max_prune_ratio
        if caps is None:
            return 1.0
        if not isinstance(caps, Mapping):
            return float(caps)
        nodes = {n.name: n for n in gm.graph.nodes}
        best = 1.0
        for m in g.members:
            node = nodes.get(m.node)
            names = {m.param.rpartition(".")[0]}
            if node is not None and node.op == "call_module":
                names |= {str(node.target), type(gm.get_submodule(node.target)).__name__}
            best = min([best, *(float(caps[n]) for n in names if n in caps)])
        return best

    def align(self, original_channels: int, per_unit: int) -> int:
        """Kept units of a group must be a multiple of this (channels a multiple of its alignment)."""
        r = self.round_to
        while r > 1 and original_channels < 4 * r:
            r //= 2
        return max(1, r // math.gcd(r, per_unit))

    def floor_units(self, g: ChannelGroup, original_channels: int, cap: float = 1.0) -> tuple[int, int]:
        """(units ``g`` must keep, alignment step in units) under prune-ratio ``cap``.

        ``original_channels`` counts the group's channels in every layer it spans (as
        ``g.channels`` does); widths and alignment are those of one layer: a unit is
        ``layer_channels_per_unit(g)`` channels of each layer it touches (1, or head_dim).
        """
        orig_units = max(1, round(original_channels * g.size / max(g.channels, 1)))
        per_unit = layer_channels_per_unit(g)
        keep = max(
            1,
            math.ceil(self.min_channels / per_unit),
            math.ceil(self.min_keep * orig_units - 1e-9),
            math.ceil((1 - cap) * orig_units - 1e-9),
        )
        step = self.align(orig_units * per_unit, per_unit)
        return min(math.ceil(keep / step) * step, max(orig_units, keep)), step


def layer_channels_per_unit(g: ChannelGroup) -> int:
    """Channels one unit of ``g`` holds in one layer: 1 for a channel, head_dim for a head, the group
    count for a grouped conv's in-group position (the smallest whole ratio over the group's members)."""
    ratios = [m.count // g.size for m in g.members if g.size and m.count and m.count % g.size == 0]
    return max(1, min(ratios)) if ratios else 1


def removal_order(g: ChannelGroup, scores: np.ndarray, floor: int, part_keep: float = 0.0) -> list[int]:
    """The units ``g`` may lose, lowest score first; units that would empty a part (or take it below
    ``part_keep`` of its width: a concatenated branch is a layer too) are skipped."""
    order = np.argsort(np.asarray(scores, dtype=float), kind="stable")
    part_of = {int(u): k for k, part in enumerate(g.parts) for u in part.tolist()}
    left = [len(p) for p in g.parts]
    least = [max(1, math.ceil(part_keep * n - 1e-9)) for n in left]
    taken: list[int] = []
    for i in order.tolist():
        if g.size - len(taken) <= floor:
            break
        k = part_of.get(i)
        if k is not None and left[k] - 1 < least[k]:
            continue
        taken.append(i)
        if k is not None:
            left[k] -= 1
        if g.violated_part(taken) is not None:
            taken.pop()
            if k is not None:
                left[k] += 1
    return taken


def chunk_bounds(size: int, removable: int, step: int) -> list[int]:
    """Cumulative removal counts at which the kept width is aligned (``size − b`` a multiple of ``step``)."""
    low = size - removable
    kept = (size - 1) // step * step
    out = []
    while kept >= max(low, 1):
        out.append(size - kept)
        kept -= step
    return out


def normalise_per_group(scores: Scores) -> Scores:
    """Each group's scores divided by their mean: the ranking compares units to their own layer.

    Raw divergence is not comparable across layers (measured: on the digits CNN a global
    ranking of raw scores emptied one 8×8 layer and kept 12.5 % accuracy at 70 % MACs;
    normalised, 97.5 %). Groups whose mean is not a positive finite number keep raw scores.
    """
    out = {}
    for gid, s in scores.items():
        s = np.asarray(s, dtype=float)
        mean = s.mean() if s.size else 0.0
        out[gid] = s / mean if np.isfinite(mean) and mean > 0 else s
    return out


@dataclass
class _Chunk:
    priority: float
    gid: str
    index: int
    end: int  # cumulative units removed from the group once this chunk is taken


class Allocation:
    """Ranked, aligned removal chunks of every group; ``plan(n)`` takes the first ≥ ``n`` units."""

    def __init__(
        self, orders: dict[str, list[int]], bounds: dict[str, list[int]], keys: dict[str, list[float]]
    ):
        chunks = []
        for gid, ends in bounds.items():
            pri = np.maximum.accumulate(np.asarray(keys[gid], dtype=float)) if ends else []
            chunks += [_Chunk(float(p), gid, j, e) for j, (p, e) in enumerate(zip(pri, ends, strict=True))]
        chunks.sort(key=lambda c: (c.priority, c.gid, c.index))
        self.chunks, self.orders, self.bounds = chunks, orders, bounds
        self.removable = sum(ends[-1] for ends in bounds.values() if ends)

    def _take(self, n: int) -> tuple[dict[str, int], _Chunk | None]:
        done: dict[str, int] = {}
        total, last = 0, None
        for c in self.chunks:
            if total >= n:
                break
            total += c.end - done.get(c.gid, 0)
            done[c.gid], last = c.end, c
        return done, last

    def _plan(self, done: dict[str, int]) -> Plan:
        return {gid: sorted(self.orders[gid][:k]) for gid, k in done.items() if k}

    def plan(self, n: int) -> Plan:
        """The plan removing the best-ranked chunks until at least ``n`` units go."""
        return self._plan(self._take(n)[0])

    def _back(self, gid: str, end: int) -> int:
        ends = self.bounds[gid]
        j = ends.index(end)
        return ends[j - 1] if j else 0

    def alternatives(self, n: int, limit: int = 24) -> list[Plan]:
        """Plans next to ``plan(n)`` for when its last chunk overshoots a target by a whole aligned chunk.

        The last chunk is swapped for the next chunk of another group (best-ranked first, at
        most ``limit``), alone and with one more chunk of the last chunk's group handed back.
        """
        done, last = self._take(n)
        if last is None:
            return []
        prev = {**done, last.gid: self._back(last.gid, last.end)}
        nexts = []
        for gid, ends in self.bounds.items():
            later = [e for e in ends if e > prev.get(gid, 0)]
            if gid != last.gid and later:
                nexts.append(
                    (min(c.priority for c in self.chunks if c.gid == gid and c.end == later[0]), gid)
                )
        out = []
        for _, gid in sorted(nexts)[:limit]:
            swap = {**prev, gid: next(e for e in self.bounds[gid] if e > prev.get(gid, 0))}
            out.append(self._plan(swap))
            if prev[last.gid]:
                out.append(self._plan({**swap, last.gid: self._back(last.gid, prev[last.gid])}))
        return out


def _chunk_keys(unit_keys: np.ndarray, order: list[int], ends: list[int]) -> list[float]:
    starts = [0, *ends][: len(ends)]  # no chunk (a group at its floor): no key
    return [float(np.mean(unit_keys[order[a:b]])) for a, b in zip(starts, ends, strict=True)]


def allocate(
    allocator: str,
    gm: fx.GraphModule,
    dg: DependencyGraph,
    groups: Sequence[ChannelGroup],
    scores: Scores,
    *,
    floors: Floors,
    widths: OriginalWidths,
    example_inputs: Sequence[Any],
    cost: str = "macs",
    batches: Sequence[Any] = (),
    costs: Mapping[str, tuple[float, float]] | None = None,
) -> Allocation:
    """Rank the aligned removal chunks of ``groups`` with ``allocator`` (see the module docstring).

    ``costs`` (``unit_costs`` of ``groups``) may be passed when the caller measured them already.
    """
    if allocator not in ALLOCATORS or allocator == "auto":
        raise IdapError(f"allocator must be one of {list(ALLOCATORS[1:])} here, got {allocator!r}")
    orders, bounds = {}, {}
    for g in groups:
        floor, step = floors.floor_units(g, widths.channels(g), floors.cap(gm, g))
        scale = widths.channels(g) / max(g.channels, 1)
        orders[g.id] = removal_order(g, scores[g.id], floor, floors.min_keep * scale)
        bounds[g.id] = chunk_bounds(g.size, len(orders[g.id]), step)
    if allocator in ("global", "group"):
        unit = scores if allocator == "global" else normalise_per_group(scores)
        keys = {g.id: _chunk_keys(np.asarray(unit[g.id], float), orders[g.id], bounds[g.id]) for g in groups}
        return Allocation(orders, bounds, keys)
    costs = costs if costs is not None else unit_costs(gm, groups, example_inputs)
    per = {gid: c[0] if cost == "macs" else c[1] for gid, c in costs.items()}
    if allocator == "cost":
        mean_cost = np.mean([v for v in per.values()]) if per else 1.0
        norm = normalise_per_group(scores)
        keys = {}
        for g in groups:
            rel = max(per[g.id] / mean_cost, 1e-12) if mean_cost > 0 else 1.0
            keys[g.id] = _chunk_keys(np.asarray(norm[g.id], float) / rel, orders[g.id], bounds[g.id])
        return Allocation(orders, bounds, keys)
    from idap_fx.rewrite.surgery import masked_call

    reference = reference_outputs(gm, batches)
    keys = {}
    for g in groups:
        ends = bounds[g.id]
        if not ends:
            keys[g.id] = []
            continue
        probes = sorted({ends[min(len(ends) - 1, round(q * (len(ends) - 1)))] for q in (0.0, 0.5, 1.0)})
        dev = [0.0] + [
            deviation(reference, masked_call(gm, {g.id: orders[g.id][:k]}, dg), batches) for k in probes
        ]
        curve = np.interp(ends, [0, *probes], dev)
        keys[g.id] = _hull_slopes(np.asarray(ends, float) * max(per[g.id], 1e-12), curve)
    return Allocation(orders, bounds, keys)


def _hull_slopes(saved: np.ndarray, deviation: np.ndarray) -> list[float]:
    """Slope of the lower convex hull of (0, 0), (saved_j, deviation_j) at every chunk."""
    xs, ys = np.concatenate([[0.0], saved]), np.concatenate([[0.0], deviation])
    hull = [0]
    for i in range(1, len(xs)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (ys[b] - ys[a]) * (xs[i] - xs[a]) >= (ys[i] - ys[a]) * (xs[b] - xs[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    slopes = []
    for j in range(1, len(xs)):
        k = next(h for h in hull if h >= j)
        prev = hull[hull.index(k) - 1]
        slopes.append(float((ys[k] - ys[prev]) / max(xs[k] - xs[prev], 1e-30)))
    return slopes


def select_units(
    scores: Scores, groups: Sequence[ChannelGroup], count: int, *, min_channels: int = 1, round_to: int = 1
) -> Plan:
    """The ``count`` lowest raw scores across ``groups`` (global ranking, no width floor), aligned."""
    if count <= 0:
        return {}
    floors = Floors(min_keep=0.0, min_channels=min_channels, round_to=round_to)
    orders, bounds = {}, {}
    for g in groups:
        floor, step = floors.floor_units(g, g.channels)
        orders[g.id] = removal_order(g, scores[g.id], floor)
        bounds[g.id] = chunk_bounds(g.size, len(orders[g.id]), step)
    keys = {g.id: _chunk_keys(np.asarray(scores[g.id], float), orders[g.id], bounds[g.id]) for g in groups}
    return Allocation(orders, bounds, keys).plan(count)


__all__ = [
    "ALLOCATORS",
    "Allocation",
    "Floors",
    "OriginalWidths",
    "allocate",
    "normalise_per_group",
    "select_units",
]
