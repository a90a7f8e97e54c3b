"""Merging the axes of several operands that share (some) output dims.

Used by every op that lines up channels of several tensors: element-wise ops with
broadcasting, ``cat`` on its other dims, ``stack``, ``matmul`` and attention. Dims are
named by *labels* common to all operands; contracted labels are reduced away.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import networkx as nx
import numpy as np

from idap_fx.graph.layout import Axis, Layout

Label = Hashable


@dataclass
class Operand:
    """One input: its layout, its shape, and the label of each of its dims."""

    layout: Layout
    shape: tuple[int, ...]
    labels: dict[int, Label]


class Merged(NamedTuple):
    """An output axis of ``merge``: its labels, ids, and (multi-label axes) the label allowed to shrink."""

    labels: tuple[Label, ...]
    ids: np.ndarray
    free: Label | None = None


@dataclass
class _LAxis:
    operand: int
    labels: tuple[Label, ...]
    ids: np.ndarray
    free: Label | None = (
        None  # a multi-label axis: the label whose extent may shrink (heads of heads x head_dim)
    )

    def shrinkable(self) -> set[Label]:
        """Labels whose extent changes when elements go (all of them where no free label is known)."""
        if len(self.labels) > 1 and self.free is not None:
            return {self.free}
        return set(self.labels)


def collapse(coupling, ids: np.ndarray, along: Sequence[int], reason: str) -> np.ndarray:
    """Union all elements of ``ids`` along axes ``along``; return ids with those axes taken at 0."""
    if not along:
        return ids
    keep = [i for i in range(ids.ndim) if i not in along]
    moved = np.transpose(ids, keep + list(along))
    flat = moved.reshape(int(np.prod([ids.shape[i] for i in keep], dtype=np.int64)), -1)
    if flat.shape[1] > 1:
        coupling.union(np.repeat(flat[:, :1], flat.shape[1] - 1, axis=1), flat[:, 1:], reason)
    return flat[:, 0].reshape([ids.shape[i] for i in keep])


def merge(
    coupling, reason: str, operands: Sequence[Operand], contracted: Sequence[Label] = ()
) -> list[Merged]:
    """Couple the operands' axes label by label; return the surviving axes as (labels, ids).

    Two axes that share labels are made uniform along the labels they do not share and
    then coupled index by index on the shared ones. The output keeps, per cluster of
    coupled axes, one axis that covers all of the cluster's non-contracted labels. An
    operand with a real (non-broadcast) extent on a label where it carries no channels
    pins that label: every axis over it is frozen. A one-channel axis broadcast against another
    input's extent (multi-query attention's single key / value head against the query heads, a
    one-channel gate against a feature map) is pinned and couples nothing: it is read by every
    output channel, so it stays, and the other input's channels go on their own. An axis lying only along the fixed labels of
    another operand's multi-label axis (a head_dim-wide q-norm weight against heads x head_dim, the
    single key head of multi-query attention contracted with every query head) varies within that
    axis's units, which never shrink there: it is pinned, not coupled.
    """
    laxes: list[_LAxis] = []
    for i, op in enumerate(operands):
        for ax in op.layout.axes:
            free = op.labels[ax.free] if ax.free is not None else None
            laxes.append(_LAxis(i, tuple(op.labels[d] for d in ax.dims), ax.ids, free))
    real: list[set[Label]] = [
        {op.labels[d] for d, s in enumerate(op.shape) if s > 1 and d in op.labels} for op in operands
    ]
    laxes = _drop_broadcast(coupling, reason, _drop_within_unit(coupling, reason, laxes), real)
    if not laxes:
        return []
    g = nx.Graph()
    g.add_nodes_from(range(len(laxes)))
    by_label: dict[Label, int] = {}
    for k, la in enumerate(laxes):
        for lab in la.labels:
            if lab in by_label:
                g.add_edge(by_label[lab], k)
            by_label[lab] = k
    out: list[Merged] = []
    for comp in nx.connected_components(g):
        cluster = [laxes[k] for k in sorted(comp)]
        problem = _problem(cluster, operands, real)
        out_labels = {lab for la in cluster for lab in la.labels if lab not in contracted}
        cover = [la for la in cluster if out_labels <= set(la.labels)]
        if problem is None and not cover:
            problem = "output channels would come from two unrelated inputs"
        if problem:
            for la in cluster:
                coupling.freeze(la.ids, f"{reason}: {problem}")
            continue
        for x, la in enumerate(cluster):
            for lb in cluster[x + 1 :]:
                common = [lab for lab in la.labels if lab in lb.labels]
                if common:
                    coupling.union(
                        _restrict(coupling, la, common, reason),
                        _restrict(coupling, lb, common, reason),
                        reason,
                    )
        widest = cover[0]
        kept = tuple(lab for lab in widest.labels if lab not in contracted)
        if kept:  # a fully contracted axis leaves no output channels, and its units stay apart
            gone = [j for j, lab in enumerate(widest.labels) if lab in contracted]
            free = next((la.free for la in cluster if la.free in kept), None) if len(kept) > 1 else None
            out.append(Merged(kept, collapse(coupling, widest.ids, gone, reason), free))
    return out


def _drop_within_unit(coupling, reason: str, laxes: list[_LAxis]) -> list[_LAxis]:
    """Pin and drop the axes that lie only along another operand's fixed (never shrinking) labels."""
    fixed = [(la.operand, set(la.labels) - la.shrinkable()) for la in laxes if len(la.labels) > 1]
    kept = []
    for lb in laxes:
        if any(op != lb.operand and set(lb.labels) <= labs for op, labs in fixed):
            coupling.pin(lb.ids, f"{reason}: read within every unit (e.g. head) of another input")
        else:
            kept.append(lb)
    return kept


def _drop_broadcast(coupling, reason: str, laxes: list[_LAxis], real: list[set[Label]]) -> list[_LAxis]:
    """Pin and drop the axes with one element along a label where another input has a real extent,
    unless another input's axis may shrink along one of their other labels (then ``_problem`` freezes)."""
    kept = []
    for la in laxes:
        broadcast = {
            lab
            for lab, size in zip(la.labels, la.ids.shape, strict=True)
            if size == 1 and any(lab in r for k, r in enumerate(real) if k != la.operand)
        }
        shrinking = {lab for lb in laxes if lb.operand != la.operand for lab in lb.shrinkable()}
        if broadcast and not (set(la.labels) - broadcast) & shrinking:
            coupling.pin(la.ids, f"{reason}: one channel broadcast against many")
        else:
            kept.append(la)
    return kept


def _problem(cluster: list[_LAxis], operands: Sequence[Operand], real: list[set[Label]]) -> str | None:
    labels = {lab for la in cluster for lab in la.shrinkable()}
    for i in range(len(operands)):
        covered = {lab for la in cluster if la.operand == i for lab in la.labels}
        if (real[i] & labels) - covered:
            return f"input {i} has a fixed extent where another input's channels flow"
    for la in cluster:
        for lab, size in zip(la.labels, la.ids.shape, strict=True):
            if size == 1 and any(lab in r for r in real):
                return "a one-channel tensor is broadcast against channels that may go"
    return None


def _restrict(coupling, la: _LAxis, common: list[Label], reason: str) -> np.ndarray:
    """``la``'s ids made uniform outside ``common`` and ordered as ``common``."""
    extra = [j for j, lab in enumerate(la.labels) if lab not in common]
    reduced = collapse(coupling, la.ids, extra, reason)
    rest = [lab for lab in la.labels if lab in common]
    return np.transpose(reduced, [rest.index(lab) for lab in common])


def to_layout(ndim: int, axes: list[Merged], dim_of: dict[Label, int]) -> Layout:
    """Build an output layout from merged axes, mapping labels to output dims."""
    return Layout(
        ndim,
        tuple(
            Axis(
                tuple(dim_of[lab] for lab in m.labels), m.ids, None if m.free is None else dim_of[m.free]
            ).sorted()
            for m in axes
        ),
    )
