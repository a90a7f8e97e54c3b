"""Channel layouts: which dims of a tensor carry which channel elements.

Every channel the analyzer tracks is an *element*: a global integer id. A tensor's
``Layout`` lists its channel-carrying *axes*; an axis covers one or more tensor dims
and holds, for every position along them, the element id found there. Most tensors
have one axis on one dim (the conv channel dim). ``cat`` concatenates id arrays,
``split`` slices them, ``flatten`` repeats them, a ``view`` into heads turns one dim
into two. Removing an element removes every position that holds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from torch import fx


@dataclass(frozen=True, eq=False)
class Axis:
    """Tensor dims ``dims`` jointly carry element ids ``ids`` (``ids.ndim == len(dims)``)."""

    dims: tuple[int, ...]
    ids: np.ndarray
    free: int | None = None  # for a multi-dim axis: the one dim that shrinks (units are its slices)

    def __post_init__(self) -> None:
        assert self.ids.ndim == len(self.dims), (self.dims, self.ids.shape)

    def sorted(self) -> Axis:
        """The same axis with dims ascending (ids transposed to match)."""
        order = sorted(range(len(self.dims)), key=lambda i: self.dims[i])
        if order == list(range(len(self.dims))):
            return self
        return Axis(tuple(self.dims[i] for i in order), np.transpose(self.ids, order), self.free)

    def moved(self, dim_map: dict[int, int]) -> Axis:
        """Rename dims through ``dim_map`` (old dim -> new dim)."""
        free = None if self.free is None else dim_map[self.free]
        return Axis(tuple(dim_map[d] for d in self.dims), self.ids, free).sorted()

    def size_ids(self, dim: int) -> np.ndarray:
        """Elements whose removal changes the extent of ``dim`` (none for a fixed sub-dim)."""
        if len(self.dims) == 1 or self.free == dim:
            return self.ids.ravel()
        return np.zeros(0, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class Layout:
    """The channel-carrying axes of one tensor of rank ``ndim``."""

    ndim: int
    axes: tuple[Axis, ...] = ()

    def axis_of(self, dim: int) -> Axis | None:
        """The axis that covers ``dim``, if any."""
        for axis in self.axes:
            if dim in axis.dims:
                return axis
        return None

    def carried(self) -> set[int]:
        """All dims that carry channels."""
        return {d for axis in self.axes for d in axis.dims}

    def moved(self, dim_map: dict[int, int], ndim: int) -> Layout:
        """Rename dims; every carried dim must be in ``dim_map``."""
        return Layout(ndim, tuple(a.moved(dim_map) for a in self.axes))


_NO_IDS = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class Dynamic:
    """A non-tensor value computed in the graph (a size, a shape tuple, a flag).

    ``taint`` lists the elements whose removal changes the value (it was read off a
    prunable dim); ``size_of`` is set when the value is exactly the extent of dim
    ``size_of[1]`` of a tensor with layout ``size_of[0]``; ``shape_of`` when it is a
    whole ``x.shape``.
    """

    node: fx.Node
    taint: np.ndarray = field(default_factory=lambda: _NO_IDS)
    size_of: tuple[Layout, int] | None = None
    shape_of: Layout | None = None


def layouts_in(value: object) -> list[Layout]:
    """Every Layout inside a (nested) list / tuple / dict value, in order."""
    if isinstance(value, Layout):
        return [value]
    if isinstance(value, (list, tuple)):
        return [lay for v in value for lay in layouts_in(v)]
    if isinstance(value, dict):
        return [lay for v in value.values() for lay in layouts_in(v)]
    return []


def dim_ids(layout: Layout, dim: int) -> np.ndarray:
    """Elements whose removal changes the extent of ``dim`` of a tensor with ``layout``."""
    axis = layout.axis_of(dim)
    return _NO_IDS if axis is None else axis.size_ids(dim)


def all_ids(layout: Layout) -> np.ndarray:
    """Every element id in ``layout`` (flattened, with repeats)."""
    if not layout.axes:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([a.ids.ravel() for a in layout.axes])
