"""Helpers for running idap_fx under ``torch.distributed`` (torchrun, any backend).

idap_fx itself only reduces what must be global (calibration statistics, the label-free
budget) and lets ``DistributedDataParallel`` train; these helpers cover what a user
script around it needs so that N processes behave like one:

* ``is_distributed`` / ``rank`` / ``world_size`` / ``is_main`` — where am I (a plain
  single process is rank 0 of 1, so the same script runs with and without torchrun);
* ``barrier(timeout)`` — a barrier that fails with the late ranks named instead of
  hanging until the process group's timeout;
* ``all_sum`` — sum a few floats over ranks (the budget's numerator and denominator);
* ``all_max`` — the largest of one float over ranks (the per-sample budget);
* ``check_same`` — fail clearly when ranks disagree (plans, weight fingerprints) instead
  of deadlocking later on mismatched collectives;
* ``main_output(path)`` — rank 0 alone writes a file, atomically, and it appears only
  when every rank finished the block without error; the other ranks wait for it;
* ``fail_fast()`` — a rank that raises publishes its error in the process group's store
  and closes its connections, so the other ranks stop at their next collective with a
  ``DistributedError`` naming the failed rank and its error, not after a timeout.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from idap_fx.deploy.files import atomic_output
from idap_fx.errors import IdapError
from idap_fx.method.collective import device, initialised, reducer

_PREFIX = "idap_fx/fail_fast"


class DistributedError(IdapError):
    """Another rank failed, ranks disagree, or a rank did not arrive in time."""


def is_distributed() -> bool:
    """Whether a default ``torch.distributed`` process group is initialised in this process."""
    return initialised()


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """How many processes take part (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this is rank 0, the one that writes outputs."""
    return rank() == 0


def _delta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def barrier(timeout: float = 300.0, what: str = "barrier") -> None:
    """Wait until every rank arrives; raise ``DistributedError`` after ``timeout`` seconds.

    With gloo this is ``monitored_barrier``, whose error names the ranks that did not
    arrive; other backends wait on an asynchronous ``barrier`` with the same bound.
    """
    if not is_distributed():
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=_delta(timeout), wait_all_ranks=True)
        else:
            dist.barrier(async_op=True).wait(_delta(timeout))
    except RuntimeError as exc:
        raise DistributedError(
            f"rank {rank()}: {what}: not every rank arrived within {timeout:g} s ({exc})"
        ) from exc


def all_sum(values: Sequence[float]) -> list[float]:
    """``values`` summed element-wise over every rank (unchanged when not distributed), in float64."""
    return reducer().all_sum(values)


def all_max(value: float) -> float:
    """The largest ``value`` over every rank (unchanged when not distributed), in float64."""
    return reducer().all_max(value)


def check_same(value: Any, what: str) -> None:
    """Raise ``DistributedError`` on every rank unless all ranks hold an equal (picklable) ``value``."""
    if not is_distributed():
        return
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, pickle.dumps(value))
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        raise DistributedError(f"ranks disagree on {what}: ranks {differ} differ from rank 0")


def _agree(error: str | None, timeout: float | None) -> dict[int, str]:
    """Exchange a per-rank error (or None); return the errors of every rank that had one."""
    flag = torch.tensor([0.0 if error is None else 1.0], device=device())
    work = dist.all_reduce(flag, async_op=True)
    try:
        if timeout is None:
            work.wait()
        else:
            work.wait(_delta(timeout))
    except RuntimeError as exc:
        raise DistributedError(
            f"rank {rank()}: not every rank reached the output step within {timeout} s ({exc})"
        ) from exc
    if flag.item() == 0:
        return {}
    errors: list[Any] = [None] * world_size()
    dist.all_gather_object(errors, error)
    return {r: e for r, e in enumerate(errors) if e is not None}


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def main_output(path: str | os.PathLike[str], *, timeout: float | None = None) -> Iterator[str | None]:
    """Rank 0 writes ``path``; every rank enters the block, the others get ``None``.

    Rank 0 gets a temporary path beside ``path`` to write to (``torch.save(obj, tmp)``,
    ``idap_fx.save(result, tmp)``, ...). After the block all ranks exchange whether
    they succeeded; the file is moved onto ``path`` only if every rank did, so a failure
    anywhere leaves no partial or half-agreed output, and every rank raises (rank 0's
    own error there, ``DistributedError`` naming it on the others). ``timeout`` bounds
    how long a rank waits for the others at each exchange (default: the process
    group's timeout). Without ``torch.distributed`` it is a plain atomic write.
    """
    if not is_distributed():
        with atomic_output(path) as tmp:
            yield tmp
        return
    with contextlib.ExitStack() as stack:
        tmp, error = None, None
        if is_main():
            try:
                tmp = stack.enter_context(atomic_output(path))
            except IdapError as exc:
                error = exc
        failed = _agree(None if error is None else _describe(error), timeout)
        if error is not None:
            raise error
        if failed:
            raise DistributedError(f"rank 0 cannot write {os.fspath(path)}: {failed[0]}")
        try:
            yield tmp
        except BaseException as exc:
            with contextlib.suppress(Exception):  # tell the others; a broken group fails them anyway
                _agree(_describe(exc), timeout)
            raise
        failed = _agree(None, timeout)
        if failed:
            who = "; ".join(f"rank {r}: {e}" for r, e in failed.items())
            raise DistributedError(f"{os.fspath(path)} was not written because {who}")


def _store() -> Any:
    """The default process group's key-value store (None if it has none)."""
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError):
        return None


def _reported(store: Any, me: int, n: int) -> dict[int, str]:
    """Errors other ranks published through ``fail_fast``."""
    found = {}
    for r in range(n):
        key = f"{_PREFIX}/error/{r}"
        if r != me and store.check([key]):
            found[r] = store.get(key).decode(errors="replace")
    return found


@contextlib.contextmanager
def fail_fast(grace: float = 10.0) -> Iterator[None]:
    """Make an exception on one rank stop every rank promptly, with a clear error.

    Wrap each rank's whole job in it (also usable as a decorator). When the block
    raises on a rank, that rank publishes the error in the process group's store and
    destroys its process group, which breaks the others' pending and next collectives
    at once. A rank whose collective broke that way raises ``DistributedError`` naming
    the rank that failed and its error. The failing rank waits up to ``grace`` seconds
    for the others to read the error (the store may live in its process), then
    re-raises its own exception. Not distributed: does nothing.
    """
    try:
        yield
    except (Exception, KeyboardInterrupt) as exc:
        if not is_distributed():
            raise
        store, me, n = _store(), rank(), world_size()
        if store is None:
            raise
        if isinstance(exc, DistributedError):  # already a coordinated failure: every rank knows
            with contextlib.suppress(RuntimeError):
                store.set(f"{_PREFIX}/done/{me}", "1")
            raise
        try:
            others = _reported(store, me, n)
        except RuntimeError:  # the store is gone with the rank that hosted it
            raise DistributedError(
                f"rank {me}: lost contact with the other ranks (one failed or exited): {_describe(exc)}"
            ) from exc
        if others:
            with contextlib.suppress(RuntimeError):
                store.set(f"{_PREFIX}/done/{me}", "1")
            who = "; ".join(f"rank {r} failed with {e}" for r, e in sorted(others.items()))
            raise DistributedError(f"{who}; rank {me} stopped too") from exc
        with contextlib.suppress(RuntimeError):
            store.set(f"{_PREFIX}/error/{me}", _describe(exc))
        with contextlib.suppress(RuntimeError):
            dist.destroy_process_group()
        with contextlib.suppress(RuntimeError):
            store.wait([f"{_PREFIX}/done/{r}" for r in range(n) if r != me], _delta(grace))
        raise


__all__ = [
    "DistributedError",
    "all_max",
    "all_sum",
    "barrier",
    "check_same",
    "fail_fast",
    "is_distributed",
    "is_main",
    "main_output",
    "rank",
    "world_size",
]
