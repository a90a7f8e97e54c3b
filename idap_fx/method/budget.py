"""The accuracy budget: how much quality a pruning step may cost before it is rolled back.

Two forms (method notes §4):

* with ``evaluate(model) -> float`` (higher is better): the absolute drop from the
  original model's value must stay ≤ ``budget``;
* without labels (the default): the relative output deviation on the held-out calibration
  batches (never used for scoring), in one of two forms (``reduce``):

  - ``"pooled"`` (default): Σ_x ‖N0(x) − N(x)‖² / Σ_x ‖N0(x)‖² ≤ ``budget``, sums over
    every held-out sample and output tensor: a mean, weighted by each sample's output energy;
  - ``"max"``: max_x ‖N0(x) − N(x)‖² / ‖N0(x)‖² ≤ ``budget``, the per-sample bound the method
    states (§4), taken separately for each output tensor (dim 0 is the batch); stricter, and
    it grows with the number of held-out samples.

``budget=None`` switches the check off (pure target-driven pruning); then nothing is
measured (``measure=False``: quality and consumed are NaN) unless a layer tolerance needs it.
``optimize`` withholds calibration batches only for the label-free form.

Under ``torch.distributed`` each rank holds its own held-out batches; the pooled numerator
and denominator are summed over ranks (the per-sample maximum is maximised over ranks), so
every rank gets the deviation over all held-out data and makes the same decision.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from idap_fx.errors import BudgetError
from idap_fx.method.channel_stats import batch_args
from idap_fx.method.collective import reducer
from idap_fx.options import budget_limit


def reference_outputs(model: Callable[..., Any], batches: Sequence[Any]) -> list[list[torch.Tensor]]:
    """Every tensor ``model`` returns on each batch, in float64 (what deviations are measured against)."""
    with torch.no_grad():
        return [
            [t.detach().double() for t in tree_leaves(model(*batch_args(b))) if isinstance(t, torch.Tensor)]
            for b in batches
        ]


def deviation(
    reference: list[list[torch.Tensor]], model: Callable[..., Any], batches: Sequence[Any]
) -> float:
    """‖N0(x) − N(x)‖² / ‖N0(x)‖² pooled over ``batches`` of every rank (one value on all ranks);
    ``reference`` is ``reference_outputs`` of N0 on the same batches. NaN counts as ∞."""
    num = den = 0.0
    for ref, got in zip(reference, reference_outputs(model, batches), strict=True):
        for r, g in zip(ref, got, strict=True):
            num += (r - g).pow(2).sum().item()
            den += r.pow(2).sum().item()
    num, den = reducer().all_sum([num, den])
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den if not math.isnan(num) else math.inf


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
        *,
        reduce: str = "pooled",
        measure: bool = True,
    ) -> None:
        self.limit = budget_limit(limit)
        if reduce not in ("pooled", "max"):
            raise BudgetError(f"budget_reduce must be 'pooled' or 'max', got {reduce!r}")
        self.reduce, self.measure = reduce, measure or evaluate is not None
        self.evaluate = evaluate
        self.holdout = list(holdout)
        self.kind = "off" if limit is None else ("evaluate" if evaluate is not None else "output_deviation")
        if self.kind == "output_deviation" and reduce == "max":
            self.kind = "output_deviation_max"
        self.baseline = self._evaluate(reference) if evaluate is not None else 1.0
        self._ref = reference_outputs(reference, self.holdout) if self.measure else []

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
        """Relative output deviation on the held-out batches of every rank (pooled or per-sample max)."""
        if self.reduce == "max":
            return self._max_deviation(model)
        return deviation(self._ref, model, self.holdout)

    def _max_deviation(self, model: nn.Module) -> float:
        worst = 0.0
        for ref, got in zip(self._ref, reference_outputs(model, self.holdout), strict=True):
            for r, g in zip(ref, got, strict=True):
                r, g = (
                    r.reshape(r.shape[0] if r.dim() else 1, -1),
                    g.reshape(g.shape[0] if g.dim() else 1, -1),
                )
                num, den = (r - g).pow(2).sum(1), r.pow(2).sum(1)
                ratio = torch.where(den > 0, num / den.clamp_min(1e-300), torch.where(num > 0, math.inf, 0.0))
                ratio = torch.nan_to_num(ratio, nan=math.inf, posinf=math.inf)
                worst = max(worst, float(ratio.max())) if ratio.numel() else worst
        return reducer().all_max(worst)

    def held_out(self, model: nn.Module) -> float:
        """What ``model`` consumes of the budget (lower is better): the held-out measure recovery keeps the best of."""
        return self.check(model).consumed

    @property
    def recovery_measure(self) -> Callable[[nn.Module], float] | None:
        """``held_out`` when this budget measures anything (recovery keeps its best state on it), else None."""
        return self.held_out if self.measure else None

    def check(self, model: nn.Module) -> Verdict:
        """Measure ``model``; ``ok`` says whether it is within budget (always, when the budget is off)."""
        if not self.measure:
            return Verdict(math.nan, math.nan, True)
        if self.evaluate is not None:
            quality = self._evaluate(model)
            consumed = self.baseline - quality
        else:
            consumed = self.deviation(model)
            quality = 1.0 - consumed
        ok = self.limit is None or consumed <= self.limit
        return Verdict(quality, consumed, ok)
