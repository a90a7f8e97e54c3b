"""Pruning schedules: the fraction of the remaining prunable units removed at step ``t``.

* ``IdapSchedule`` — IDAP++'s ρ_t = ρ0·(1 + t/T)^α, capped at ``rho_max`` (defaults
  ρ0 = 0.10, α = 1.5, T = 20: the authors' experiments).
* ``CubicSchedule`` — Zhu & Gupta's gradual schedule ("To prune, or not to prune"):
  cumulative sparsity s_t = s_f + (s_i − s_f)(1 − t/T)³, turned into the per-step
  fraction of what remains, 1 − (1 − s_{t+1}) / (1 − s_t).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from idap_fx.errors import IdapError


class Schedule(Protocol):
    """How much to remove at each step."""

    steps: int

    def rho(self, t: int) -> float:
        """Fraction (0..1) of the currently remaining prunable units to remove at step ``t``."""
        ...


@dataclass(frozen=True)
class IdapSchedule:
    """ρ_t = ρ0·(1 + t/T)^α, at most ``rho_max``."""

    rho0: float = 0.10
    alpha: float = 1.5
    steps: int = 20
    rho_max: float = 0.5

    def __post_init__(self) -> None:
        if not (0 < self.rho0 <= 1 and 0 < self.rho_max <= 1 and self.steps >= 1):
            raise IdapError(
                f"IdapSchedule needs 0 < rho0 <= 1, 0 < rho_max <= 1 and steps >= 1, got {self!r}"
            )

    def rho(self, t: int) -> float:
        return min(self.rho_max, self.rho0 * (1 + t / self.steps) ** self.alpha)


@dataclass(frozen=True)
class CubicSchedule:
    """Zhu & Gupta cubic sparsity ramp from ``initial`` to ``final`` over ``steps`` steps."""

    final: float = 0.5
    initial: float = 0.0
    steps: int = 10

    def __post_init__(self) -> None:
        if not (0 <= self.initial < self.final < 1 and self.steps >= 1):
            raise IdapError(f"CubicSchedule needs 0 <= initial < final < 1 and steps >= 1, got {self!r}")

    def sparsity(self, t: int) -> float:
        """Cumulative fraction of units removed after ``t`` steps."""
        t = min(t, self.steps)
        return self.final + (self.initial - self.final) * (1 - t / self.steps) ** 3

    def rho(self, t: int) -> float:
        before, after = self.sparsity(t), self.sparsity(t + 1)
        return max(0.0, 1 - (1 - after) / (1 - before))


def get_schedule(schedule: str | Schedule | None, *, final: float = 0.5) -> Schedule:
    """``"idap"`` (default), ``"cubic"`` (ramping to ``final`` sparsity) or a Schedule object."""
    if schedule is None or schedule == "idap":
        return IdapSchedule()
    if schedule == "cubic":
        return CubicSchedule(final=final)
    if isinstance(schedule, str):
        raise IdapError(f"unknown schedule {schedule!r}; choose 'idap', 'cubic' or pass a Schedule object")
    return schedule
