"""Dependency groups: the result of the analysis, and the recorder that builds it.

While rules run, a ``Coupling`` records *spaces* (index ranges opened by a producer:
a conv's output channels, a parameter's dim, a graph input's dim), *unions* (element
``i`` here must go with element ``j`` there), *members* (parameter slices that hold
channels) and *freezes*. ``Coupling.finish`` turns that into ``ChannelGroup``s:
connected components of the space graph are groups, connected components of the
element graph are the units a plan removes (networkx does both).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from idap_fx.errors import PlanError

Plan = Mapping[str, Sequence[int]]


@dataclass(frozen=True)
class Space:
    """A range of elements opened by one node (``label`` says which of its dims/roles)."""

    index: int
    node: str
    label: str
    size: int
    base: int


@dataclass(frozen=True)
class Member:
    """A parameter or buffer whose dim ``dim`` holds element ``ids[i]`` at index ``i``.

    ``role`` is ``"out"`` (channels the node produces), ``"in"`` (channels it consumes:
    the slice that masking zeroes) or ``"chan"`` (per-channel state such as BN stats).
    """

    node: str
    param: str
    dim: int
    role: str
    ids: np.ndarray


@dataclass(frozen=True)
class InputMask:
    """A non-parametric consumer: input ``arg`` (a position, or a keyword) of ``node`` reduces over these channels."""

    node: str
    arg: int | str
    dims: tuple[int, ...]
    ids: np.ndarray


@dataclass(frozen=True)
class GroupMember:
    """Where a group's channels live: ``count`` indices of ``param`` along ``dim`` from ``offset``."""

    node: str
    param: str
    dim: int
    role: str
    offset: int
    count: int


@dataclass
class ChannelGroup:
    """Coupled channels that must be removed together.

    ``size`` counts units: the indices a plan may name. A unit can stand for several
    channels (an attention head, one in-group position of a grouped conv). Pinned channels
    (``pinned_reason``: multi-query attention's one key / value head) are in no unit: they stay.
    """

    id: str
    size: int
    channels: int
    prunable: bool
    frozen_reason: str | None
    exact: bool
    inexact_reason: str | None
    members: list[GroupMember]
    spaces: list[Space] = field(repr=False)
    units: list[np.ndarray] = field(repr=False)
    parts: list[np.ndarray] = field(default_factory=list, repr=False)
    part_names: list[str] = field(default_factory=list, repr=False)
    pinned_reason: str | None = None
    """Why some channels of a prunable group always stay (they are in no unit), if any do."""

    def violated_part(self, indices: Sequence[int]) -> str | None:
        """The first part (a split branch, a layer's slice) that ``indices`` would empty, if any."""
        gone = set(int(i) for i in indices)
        for name, part in zip(self.part_names, self.parts, strict=True):
            if gone.issuperset(part.tolist()):
                return name
        return None


class Coupling:
    """Mutable record of spaces, unions, members and freezes, filled in by the rules."""

    def __init__(self) -> None:
        self.spaces: list[Space] = []
        self.n_elements = 0
        self._unions: list[tuple[np.ndarray, np.ndarray, str]] = []
        self._freezes: list[tuple[np.ndarray, str]] = []
        self._pins: list[tuple[np.ndarray, str]] = []
        self._inexact: list[tuple[np.ndarray, str]] = []
        self.members: list[Member] = []
        self.input_masks: list[InputMask] = []
        self._param_identity: dict[str, int] = {}

    def new_space(self, node: str, size: int, label: str = "out") -> np.ndarray:
        """Open ``size`` fresh elements produced by ``node``; return their ids."""
        space = Space(len(self.spaces), node, label, size, self.n_elements)
        self.spaces.append(space)
        self.n_elements += size
        return np.arange(space.base, space.base + size, dtype=np.int64)

    def union(self, a: np.ndarray, b: np.ndarray, reason: str) -> None:
        """Element ``a[i]`` and ``b[i]`` must be removed together."""
        a, b = np.broadcast_arrays(np.asarray(a), np.asarray(b))
        if a.size:
            self._unions.append((a.ravel(), b.ravel(), reason))

    def freeze(self, ids: np.ndarray, reason: str) -> None:
        """These elements (and so their whole groups) must not be pruned."""
        ids = np.asarray(ids).ravel()
        if ids.size:
            self._freezes.append((ids, reason))

    def pin(self, ids: np.ndarray, reason: str) -> None:
        """These elements (and the units they fall in) always stay; the rest of their group may go."""
        ids = np.asarray(ids).ravel()
        if ids.size:
            self._pins.append((ids, reason))

    def inexact(self, ids: np.ndarray, reason: str) -> None:
        """Pruning these changes more than masking would (e.g. LayerNorm statistics)."""
        ids = np.asarray(ids).ravel()
        if ids.size:
            self._inexact.append((ids, reason))

    def member(self, node: str, param: str, identity: int, dim: int, role: str, ids: np.ndarray) -> None:
        """Record that ``param`` (a tensor with python id ``identity``) holds ``ids`` along ``dim``."""
        self._param_identity[param] = identity
        self.members.append(Member(node, param, dim, role, np.asarray(ids, dtype=np.int64)))

    def input_mask(self, node: str, arg: int | str, dims: tuple[int, ...], ids: np.ndarray) -> None:
        """Record a non-parametric consumer of channels (masked by multiplying its input)."""
        self.input_masks.append(InputMask(node, arg, dims, np.asarray(ids, dtype=np.int64)))

    def _tie_shared_parameters(self) -> None:
        """The same tensor used twice (shared module, tied weights) has one set of rows."""
        first: dict[tuple[int, int], np.ndarray] = {}
        for m in self.members:
            key = (self._param_identity[m.param], m.dim)
            if key in first:
                if first[key].shape != m.ids.shape:
                    self.freeze(
                        np.concatenate([first[key], m.ids]), f"{m.param} is shared with mismatched uses"
                    )
                else:
                    self.union(first[key], m.ids, f"{m.param} (shared tensor)")
            else:
                first[key] = m.ids

    def finish(self) -> tuple[list[ChannelGroup], nx.Graph]:
        """Group spaces and units; return the groups and the space-level coupling graph."""
        self._tie_shared_parameters()
        n = self.n_elements
        elem_space = np.repeat(
            np.arange(len(self.spaces), dtype=np.int64), [s.size for s in self.spaces]
        ).astype(np.int64)
        if self._unions:
            ua = np.concatenate([u[0] for u in self._unions])
            ub = np.concatenate([u[1] for u in self._unions])
        else:
            ua = ub = np.zeros(0, dtype=np.int64)
        links = coo_matrix((np.ones(ua.size, dtype=np.int8), (ua, ub)), shape=(n, n))
        _, unit_of = connected_components(links, directed=False)
        unit_of = unit_of.astype(np.int64)

        spaces = nx.Graph()
        for s in self.spaces:
            spaces.add_node(s.index, node=s.node, label=s.label, size=s.size)
        for a, b, reason in self._unions:
            sa, sb = elem_space[a], elem_space[b]
            cross = sa != sb
            for x, y in set(zip(sa[cross].tolist(), sb[cross].tolist(), strict=True)):
                if spaces.has_edge(x, y):
                    spaces.edges[x, y]["reasons"].add(reason)
                else:
                    spaces.add_edge(x, y, reasons={reason})

        frozen_why = _reasons_by_space(self._freezes, elem_space)
        pinned_why = _reasons_by_space(self._pins, elem_space)
        pinned_units = np.unique(unit_of[np.concatenate([p[0] for p in self._pins])]) if self._pins else []
        pinned = np.zeros(n, dtype=bool)
        pinned[np.isin(unit_of, pinned_units)] = True
        inexact_why = _reasons_by_space(self._inexact, elem_space)
        comps = sorted((sorted(c) for c in nx.connected_components(spaces)), key=lambda c: c[0])
        elem_group = np.empty(n, dtype=np.int64)
        groups: list[ChannelGroup] = []
        for gi, comp in enumerate(comps):
            group_spaces = [self.spaces[i] for i in comp]
            elems = np.concatenate([np.arange(s.base, s.base + s.size) for s in group_spaces])
            elem_group[elems] = gi
            elems = np.sort(elems)
            units_here = unit_of[elems]
            by_unit = np.argsort(units_here, kind="stable")  # elements grouped by unit, ascending within
            _, starts = np.unique(units_here[by_unit], return_index=True)
            chunks = np.split(elems[by_unit], starts[1:])
            # units ordered by their first element; a zero-size space (an empty slice) holds none
            units = sorted((c for c in chunks if c.size and not pinned[c[0]]), key=lambda c: int(c[0]))
            frozen = _first_reasons(frozen_why, comp)
            inexact = _first_reasons(inexact_why, comp)
            anchor = group_spaces[0]
            gid = anchor.node if anchor.label == "out" else f"{anchor.node}:{anchor.label}"
            if frozen is None and all(s.label.startswith("dim") for s in group_spaces):
                frozen = f"parameter {anchor.node} is used by no channel-aware op"
            pinned_reason = _first_reasons(pinned_why, comp) if pinned[elems].any() else None
            if frozen is None and not units and pinned_reason:
                frozen = f"every channel pinned ({pinned_reason})"
            if frozen is None and len(units) < 2:
                frozen = "only one unit: nothing can be removed"
            groups.append(
                ChannelGroup(
                    id=gid,
                    size=len(units),
                    channels=int(elems.size),
                    prunable=frozen is None,
                    frozen_reason=frozen,
                    exact=inexact is None,
                    inexact_reason=inexact,
                    members=[],
                    spaces=group_spaces,
                    units=units,
                    pinned_reason=pinned_reason,
                )
            )
        self._attach_members(groups, elem_group)
        for g in groups:
            for s in g.spaces:
                spaces.nodes[s.index]["group"] = g.id
        return groups, spaces

    def _attach_members(self, groups: list[ChannelGroup], elem_group: np.ndarray) -> None:
        """Each member's slice into the group(s) its elements fall in; a member covering only some
        of a group's units makes a part (a concatenated branch, a split piece)."""
        local_unit = np.full(self.n_elements, -1, dtype=np.int64)  # -1: a pinned element, in no unit
        for g in groups:
            for k, elems in enumerate(g.units):
                local_unit[elems] = k
        for m in self.members:
            g_of_pos = elem_group[m.ids]
            for gi in np.unique(g_of_pos):
                pos = np.nonzero(g_of_pos == gi)[0]
                group = groups[gi]
                group.members.append(GroupMember(m.node, m.param, m.dim, m.role, int(pos[0]), int(pos.size)))
                part = np.unique(local_unit[m.ids[pos]])  # a member holding pinned channels never empties
                if (
                    part[0] >= 0
                    and part.size < group.size
                    and not any(np.array_equal(part, p) for p in group.parts)
                ):
                    group.parts.append(part)
                    group.part_names.append(f"{m.param} dim {m.dim}")


def _reasons_by_space(records: list[tuple[np.ndarray, str]], elem_space: np.ndarray) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for ids, reason in records:
        for s in np.unique(elem_space[ids]).tolist():
            lst = out.setdefault(s, [])
            if reason not in lst:
                lst.append(reason)
    return out


def _first_reasons(by_space: dict[int, list[str]], comp: list[int], limit: int = 3) -> str | None:
    reasons: list[str] = []
    for s in comp:
        for r in by_space.get(s, []):
            if r not in reasons:
                reasons.append(r)
    if not reasons:
        return None
    more = f" (+{len(reasons) - limit} more)" if len(reasons) > limit else ""
    return "; ".join(reasons[:limit]) + more


class DependencyGraph:
    """Channel groups of one GraphModule, plus what the rewrite needs to apply a plan."""

    def __init__(
        self,
        groups: list[ChannelGroup],
        coupling: nx.Graph,
        layouts: dict[str, Any],
        members: list[Member],
        input_masks: list[InputMask],
        n_elements: int,
        boundaries: dict[str, str],
    ) -> None:
        self.groups = [g for g in groups if g.members]  # dims that hold no parameter are not worth listing
        self._by_id = {g.id: g for g in self.groups}
        self._coupling = coupling
        self.layouts = layouts
        self.members = members
        self.input_masks = input_masks
        self.n_elements = n_elements
        self.boundaries = boundaries

    def group(self, group_id: str) -> ChannelGroup:
        """The group named ``group_id``."""
        try:
            return self._by_id[group_id]
        except KeyError:
            raise PlanError(
                f"unknown group {group_id!r}; analyze() found {len(self.groups)} groups"
            ) from None

    @property
    def prunable(self) -> list[ChannelGroup]:
        """The groups a plan may name."""
        return [g for g in self.groups if g.prunable]

    def to_networkx(self) -> nx.Graph:
        """The coupling graph: one node per space (with its ``group``), edges say which ops coupled them."""
        return self._coupling.copy()

    def removed_elements(self, plan: Plan) -> np.ndarray:
        """Validate ``plan`` (group id -> unit indices) and return a removed-mask over elements."""
        removed = np.zeros(self.n_elements, dtype=bool)
        for gid, indices in plan.items():
            g = self.group(gid)
            idx = list(indices)
            if not idx:
                continue
            if not g.prunable:
                raise PlanError(f"group {gid!r} is frozen: {g.frozen_reason}")
            if any(not isinstance(i, (int, np.integer)) or isinstance(i, bool) for i in idx):
                raise PlanError(f"group {gid!r}: indices must be integers, got {idx!r}")
            bad = [i for i in idx if not 0 <= i < g.size]
            if bad:
                raise PlanError(f"group {gid!r}: indices {bad} out of range [0, {g.size})")
            if len(set(idx)) != len(idx):
                raise PlanError(f"group {gid!r}: duplicate indices in {idx!r}")
            if len(idx) >= g.size:
                raise PlanError(f"group {gid!r}: the plan removes all {g.size} units; keep at least one")
            if (part := g.violated_part(idx)) is not None:
                raise PlanError(
                    f"group {gid!r}: the plan removes every channel of {part}; keep at least one there"
                )
            for i in idx:
                removed[g.units[i]] = True
        return removed

    def expected_numel(self, plan: Plan) -> dict[str, tuple[int, ...]]:
        """The shape every sliced parameter must have after ``plan`` (param name -> shape)."""
        removed = self.removed_elements(plan)
        keep: dict[str, dict[int, int]] = {}
        for m in self.members:
            keep.setdefault(m.param, {})[m.dim] = int((~removed[m.ids]).sum())
        return {p: tuple(sorted(d.items())) for p, d in keep.items()}
