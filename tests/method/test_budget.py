"""Budget semantics: which batches are held out, pooled vs per-sample deviation, nothing measured when off."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import idap_fx
from idap_fx.errors import BudgetError
from idap_fx.method.budget import Budget
from idap_fx.optimize import _split_holdout


def _batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, 4, generator=g) for _ in range(n)]


@pytest.mark.parametrize(("n", "held"), [(8, [3, 7]), (5, [3]), (3, [2]), (2, [1])])
def test_held_out_batches_are_chosen_by_index_and_never_score(n: int, held: list[int]) -> None:
    b = _batches(n)
    score, out, note = _split_holdout(b, checked=True)
    assert [i for i, x in enumerate(b) if any(x is y for y in out)] == held
    assert len(score) + len(out) == n and not any(x is y for x in score for y in out)
    assert note is None


def test_one_batch_serves_both_and_nothing_is_withheld_without_a_budget() -> None:
    b = _batches(1)
    assert _split_holdout(b, checked=True)[:2] == (b, b)
    b = _batches(8)
    assert _split_holdout(b, checked=False) == (b, [], None)


def test_pooled_and_per_sample_deviation_are_what_the_docs_say() -> None:
    ref, model = nn.Linear(4, 2), nn.Linear(4, 2)
    held = _batches(2)
    with torch.no_grad():
        r = torch.cat([ref(x) for x in held]).double()
        m = torch.cat([model(x) for x in held]).double()
    per_sample = ((r - m) ** 2).sum(1) / (r**2).sum(1)
    pooled = Budget(ref, 0.1, held).deviation(model)
    worst = Budget(ref, 0.1, held, reduce="max").deviation(model)
    assert pooled == pytest.approx(float(((r - m) ** 2).sum() / (r**2).sum()), rel=1e-12)
    assert worst == pytest.approx(float(per_sample.max()), rel=1e-12)
    assert worst >= pooled
    assert Budget(ref, 0.1, held, reduce="max").kind == "output_deviation_max"
    with pytest.raises(BudgetError, match="'pooled' or 'max'"):
        Budget(ref, 0.1, held, reduce="mean")


def test_budget_off_measures_nothing() -> None:
    off = Budget(nn.Linear(4, 2), None, [], measure=False).check(nn.Linear(4, 2))
    assert off.ok and math.isnan(off.consumed) and math.isnan(off.quality)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2)).eval()
    res = idap_fx.optimize(
        model, torch.randn(1, 4), calibration=_batches(4), target_macs=0.6, budget=None, quiet=True
    )
    assert math.isnan(res.report.budget_consumed)
    assert any("no budget to check" in n for n in res.report.notes)
