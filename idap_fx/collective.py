"""Sums over processes behind one small hook: what scoring, the budget and the statistics use.

The computation modules (``scoring``, ``budget``, ``stats``, ``layer_stats``) call
``reducer().all_sum(values)`` / ``reducer().all_sum_(tensors)`` and import neither
``torch.distributed`` nor ``idap_fx.distributed``. The default reducer sums over the default
``torch.distributed`` process group when one is initialised (each rank streams its own
calibration shard; the sums make every rank's decision the same) and is the identity
otherwise. ``use_reducer`` swaps in another one (a test's fake, another backend).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

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


class TorchDistributedReducer(Reducer):
    """Sums over the default ``torch.distributed`` group when there is one, else the identity."""

    def all_sum(self, values: Sequence[float]) -> list[float]:
        if not initialised():
            return super().all_sum(values)
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device())
        dist.all_reduce(t)
        return t.tolist()

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


@contextlib.contextmanager
def use_reducer(r: Reducer) -> Iterator[Reducer]:
    """Use ``r`` inside the block (the previous reducer is restored after it)."""
    global _current
    previous, _current = _current, r
    try:
        yield r
    finally:
        _current = previous
