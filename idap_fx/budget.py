"""The accuracy budget: how much quality a pruning step may cost before it is rolled back.

Two forms (method notes §4):

* with ``evaluate(model) -> float`` (higher is better): the absolute drop from the
  original model's value must stay ≤ ``budget``;
* without labels (the default): the relative output deviation on held-out calibration
  batches, Σ‖N0(x) − N(x)‖² / Σ‖N0(x)‖² ≤ ``budget``.

``budget=None`` switches the check off (pure target-driven pruning).

Under ``torch.distributed`` each rank holds its own held-out batches; the deviation's
numerator and denominator are summed over ranks, so every rank gets the deviation over
all held-out data and makes the same accept / roll-back decision.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from idap_fx.collective import reducer
from idap_fx.errors import BudgetError
from idap_fx.options import budget_limit
from idap_fx.stats import batch_args


def _outputs(model: nn.Module, batches: Sequence[Any]) -> list[list[torch.Tensor]]:
    with torch.no_grad():
        return [
            [t.detach().double() for t in tree_leaves(model(*batch_args(b))) if isinstance(t, torch.Tensor)]
            for b in batches
        ]


@dataclass
class Verdict:
    """One budget check: the quality measured, what it consumed of the budget, and whether it fits."""

    quality: float
    consumed: float
    ok: bool


class Budget:
    """Checks candidate models against the original (``reference``)."""

    def __init__(
        self,
        reference: nn.Module,
        limit: float | None,
        holdout: Sequence[Any],
        evaluate: Callable[[nn.Module], float] | None = None,
    ) -> None:
        self.limit = budget_limit(limit)
        self.evaluate = evaluate
        self.holdout = list(holdout)
        self.kind = "off" if limit is None else ("evaluate" if evaluate is not None else "output_deviation")
        self.baseline = self._evaluate(reference) if evaluate is not None else 1.0
        self._ref = _outputs(reference, self.holdout)

    def _evaluate(self, model: nn.Module) -> float:
        try:
            value = float(self.evaluate(model))
        except Exception as exc:
            raise BudgetError(f"the evaluate callback raised {type(exc).__name__}: {exc}") from exc
        if not math.isfinite(value):
            shown = "NaN" if math.isnan(value) else value
            raise BudgetError(f"the evaluate callback returned {shown}; it must return a finite number")
        return value

    def deviation(self, model: nn.Module) -> float:
        """Relative output deviation Σ‖N0(x) − N(x)‖² / Σ‖N0(x)‖² on the held-out batches (of every rank)."""
        num = den = 0.0
        for ref, got in zip(self._ref, _outputs(model, self.holdout), strict=True):
            for r, g in zip(ref, got, strict=True):
                num += (r - g).pow(2).sum().item()
                den += r.pow(2).sum().item()
        num, den = reducer().all_sum([num, den])
        if den == 0.0:
            return 0.0 if num == 0.0 else math.inf
        return num / den if not math.isnan(num) else math.inf

    def check(self, model: nn.Module) -> Verdict:
        """Measure ``model``; ``ok`` says whether it is within budget (always, when the budget is off)."""
        if self.evaluate is not None:
            quality = self._evaluate(model)
            consumed = self.baseline - quality
        else:
            consumed = self.deviation(model)
            quality = 1.0 - consumed
        ok = self.limit is None or consumed <= self.limit
        return Verdict(quality, consumed, ok)
