"""collective.reducer(): the one way scoring, the budget and the statistics sum over processes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

import idap_fx
from idap_fx.method.budget import Budget
from idap_fx.method.collective import Reducer, reducer, use_reducer
from idap_fx.method.skip_scores import layer_scores
from idap_fx.rewrite.skip_candidates import find_candidates


class _Recording(Reducer):
    """Sums as if a second identical rank took part, and records who asked."""

    def __init__(self) -> None:
        self.floats: list[int] = []
        self.tensors = 0

    def all_sum(self, values: Sequence[float]) -> list[float]:
        self.floats.append(len(values))
        return [2.0 * float(v) for v in values]

    def all_sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        self.tensors += len(tensors)
        for t in tensors:
            t.mul_(2)


class _Res(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return self.head(y + self.body(y))


def test_scoring_budget_and_statistics_go_through_the_reducer() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm = idap_fx.trace(_Res(), x)
    dg = idap_fx.analyze(gm)
    budget = Budget(gm, 0.1, [x])
    alone = idap_fx.score(gm, dg, [x], "divergence"), budget.deviation(gm)
    fake = _Recording()
    with use_reducer(fake):
        assert reducer() is fake
        doubled = idap_fx.score(gm, dg, [x], "divergence")
        assert budget.deviation(gm) == alone[1] == 0.0  # both sums doubled: the ratio is the same
        layer_scores(gm, find_candidates(gm), [x])
    assert reducer() is not fake
    assert fake.floats and fake.tensors > 0
    for gid, s in alone[0].items():  # sums of two identical ranks over twice the samples: same means
        torch.testing.assert_close(torch.as_tensor(doubled[gid]), torch.as_tensor(s))
