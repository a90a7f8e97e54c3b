"""Sums over processes behind one small hook: what scoring, the budget and the statistics use.

The computation modules (``scoring``, ``budget``, ``stats``, ``layer_stats``) call
``reducer().all_sum(values)`` / ``reducer().all_sum_(tensors)`` and import neither
``torch.distributed`` nor ``idap_fx.distributed``. The default reducer sums over the default
``torch.distributed`` process group when one is initialised (each rank streams its own
calibration shard; the sums make every rank's decision the same) and is the identity
otherwise. ``use_reducer`` swaps in another one (a test's fake, another backend).

Batches are indexed globally: rank ``r`` holds the shard after ranks ``0 .. r-1`` (``offset``),
so ``global_slice`` picks the same batches under ``torch.distributed`` as one process holding
them all (the held-out split, the ``sensitivity`` probes, ``auto``'s selection), and
``gather`` hands every rank the same few batches where all must compute the same thing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist


def initialised() -> bool:
    """Whether a default ``torch.distributed`` process group is initialised in this process."""
    return dist.is_available() and dist.is_initialized()


def device() -> torch.device:
    """Where collective tensors must live: the current GPU for NCCL-only groups, else the CPU."""
    backend = str(dist.get_backend())
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Reducer:
    """Element-wise sums over the processes taking part; this base is the single-process identity."""

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """``values`` summed over processes, as float64 Python floats."""
        return [float(v) for v in values]

    def all_sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum each tensor over processes, in place."""

    def all_max(self, value: float) -> float:
        """The largest ``value`` over processes, as a float64 Python float."""
        return float(value)

    def offset(self, count: int) -> tuple[int, int]:
        """(global index of this process's first item, items on all processes) for ``count`` local
        items: processes hold contiguous shards in rank order."""
        return 0, count

    def gather(self, items: Sequence[Any]) -> list[Any]:
        """Every process's ``items``, in rank order: the same list on all of them."""
        return list(items)


class TorchDistributedReducer(Reducer):
    """Sums over the default ``torch.distributed`` group when there is one, else the identity."""

    def all_sum(self, values: Sequence[float]) -> list[float]:
        if not initialised():
            return super().all_sum(values)
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device())
        dist.all_reduce(t)
        return t.tolist()

    def all_max(self, value: float) -> float:
        if not initialised():
            return super().all_max(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def offset(self, count: int) -> tuple[int, int]:
        if not initialised():
            return super().offset(count)
        me, world = dist.get_rank(), dist.get_world_size()
        counts = self.all_sum([count if r == me else 0 for r in range(world)])
        return int(sum(counts[:me])), int(sum(counts))

    def gather(self, items: Sequence[Any]) -> list[Any]:
        if not initialised():
            return super().gather(items)
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, list(items))
        return [x for part in parts for x in part]

    def all_sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        if not initialised():
            return
        where = device()
        for t in tensors:
            if t.device == where:
                dist.all_reduce(t)
            else:  # an NCCL group reduces on the GPU only
                moved = t.to(where)
                dist.all_reduce(moved)
                t.copy_(moved)


_current: Reducer = TorchDistributedReducer()


def reducer() -> Reducer:
    """The reducer in use."""
    return _current


def global_slice(items: Sequence[Any], start: int, stop: int | None = None) -> tuple[list[Any], int]:
    """This process's share of the global items ``start:stop`` (all processes' items in rank order,
    as one process holding them all would index them), and the global item count."""
    offset, total = reducer().offset(len(items))
    stop = total if stop is None else stop
    return [x for i, x in enumerate(items) if start <= offset + i < stop], total


@contextlib.contextmanager
def use_reducer(r: Reducer) -> Iterator[Reducer]:
    """Use ``r`` inside the block (the previous reducer is restored after it)."""
    global _current
    previous, _current = _current, r
    try:
        yield r
    finally:
        _current = previous
