"""Schedules produce the documented sequences."""

from __future__ import annotations

import math

import pytest

from idap_fx.errors import IdapError
from idap_fx.method.schedule import CubicSchedule, IdapSchedule, get_schedule


def test_idap_schedule_defaults_follow_the_formula() -> None:
    s = IdapSchedule()
    assert (s.rho0, s.alpha, s.steps) == (0.10, 1.5, 20)
    seq = [s.rho(t) for t in range(20)]
    assert seq == pytest.approx([0.1 * (1 + t / 20) ** 1.5 for t in range(20)], rel=1e-12)
    assert seq[0] == pytest.approx(0.1)
    assert seq[10] == pytest.approx(0.1 * 1.5**1.5)  # 0.18371...
    assert seq[19] == pytest.approx(0.27230, abs=1e-5)
    assert all(a < b for a, b in zip(seq, seq[1:], strict=False))


def test_rho_max_caps_the_schedule() -> None:
    s = IdapSchedule(rho0=0.2, alpha=2.0, steps=4, rho_max=0.3)
    assert [s.rho(t) for t in range(4)] == pytest.approx([0.2, 0.3, 0.3, 0.3])


def test_cubic_schedule_reaches_final_sparsity() -> None:
    s = CubicSchedule(final=0.6, steps=5)
    remaining = math.prod(1 - s.rho(t) for t in range(5))
    assert 1 - remaining == pytest.approx(0.6)
    for t in range(6):
        assert s.sparsity(t) == pytest.approx(0.6 * (1 - (1 - t / 5) ** 3))
    # front-loaded: the first step removes the most
    assert s.rho(0) > s.rho(4)


def test_bad_schedules_are_refused() -> None:
    with pytest.raises(IdapError):
        IdapSchedule(rho0=0)
    with pytest.raises(IdapError):
        CubicSchedule(final=1.0)
    with pytest.raises(IdapError, match="unknown schedule"):
        get_schedule("linear")
    assert isinstance(get_schedule(None), IdapSchedule)
    assert isinstance(get_schedule("cubic", final=0.3), CubicSchedule)
