"""Stage 1: iterative divergence-scored channel / head pruning (method notes §2).

Each step re-analyzes and re-scores the current model, removes ⌊ρ_t·U⌋ units (U = units
still removable above the floors; which ones is decided by ``idap_fx.allocate``: the
allocator, the floors relative to the original widths, aligned widths), recovers (compensation, distillation or the user's callback) and
checks the budget. The step that would overshoot the MAC / parameter target is trimmed
by bisection on the number of units so the target is met, not passed by a whole step.
A step that breaks the budget is rolled back and retried at half size (``backtracks``
times) before pruning stops; the result is the most compressed model that stayed within
budget.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from idap_fx.allocate import Allocation, Floors, OriginalWidths, allocate
from idap_fx.analysis import analyze
from idap_fx.dependency import ChannelGroup, DependencyGraph, Plan
from idap_fx.metrics import count_macs, count_params
from idap_fx.recovery import compensate, distill, run_fine_tune
from idap_fx.schedule import Schedule
from idap_fx.scoring import Scores, ScoringContext
from idap_fx.surgery import prune


@dataclass
class StepRecord:
    """What one step did (kept in the report)."""

    step: int
    rho: float
    units_removed: int
    groups: dict[str, int]
    macs: int
    params: int
    quality: float
    budget_consumed: float
    accepted: bool
    note: str = ""


@dataclass
class PruneConfig:
    """Everything stage 1 needs besides the model (filled in by ``idap_fx.optimize``)."""

    example_inputs: tuple[Any, ...]
    calibration: list[Any]
    budget: Any  # idap_fx.budget.Budget
    schedule: Schedule
    importance: Any  # idap_fx.scoring.Importance
    macs0: int
    params0: int
    target_macs: float | None = None
    target_params: float | None = None
    floors: Floors = field(default_factory=Floors)
    allocator: str = "group"  # see idap_fx.allocate
    prune_inexact: bool = False
    compensation: bool = True
    fine_tune: Callable[[Any, Any], Any] | None = None
    train_loader: Any = None
    distill_steps: int | None = None
    loss_fn: Callable[[Any, Any], Any] | None = None
    backtracks: int = 2
    tolerance: float = 0.01
    seed: int = 0
    progress: Callable[..., Any] = field(default=lambda it, **kw: it)
    stop_check: Callable[[fx.GraphModule], str | None] | None = None  # e.g. a latency target


class PruneChannels(PassBase):
    """The stage-1 pass: call(gm) returns the most compressed model found within budget."""

    def __init__(self, config: PruneConfig) -> None:
        super().__init__()
        self.cfg = config
        self.steps: list[StepRecord] = []
        self.schedule_used: list[float] = []
        self.stop_reason = ""
        self.timings: dict[str, float] = {}
        self.last_scores: Scores = {}

    def _time(self, phase: str, start: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - start

    def requires(self, graph_module: fx.GraphModule) -> None:
        if not any("tensor_meta" in n.meta for n in graph_module.graph.nodes if n.op == "placeholder"):
            raise ValueError("prune_channels needs shapes on the graph: build it with idap_fx.trace")

    def ensures(self, graph_module: fx.GraphModule) -> None:
        graph_module.graph.lint()

    def _reached(self, macs: int, params: int) -> bool:
        cfg = self.cfg
        hit_macs = cfg.target_macs is None or macs <= cfg.target_macs * cfg.macs0 * (1 + cfg.tolerance)
        hit_params = cfg.target_params is None or params <= cfg.target_params * cfg.params0 * (
            1 + cfg.tolerance
        )
        return (cfg.target_macs is not None or cfg.target_params is not None) and hit_macs and hit_params

    def _groups(self, dg: DependencyGraph) -> list[ChannelGroup]:
        return [g for g in dg.prunable if g.exact or self.cfg.prune_inexact]

    def _candidate(
        self, gm: fx.GraphModule, dg: DependencyGraph, plan: Plan
    ) -> tuple[fx.GraphModule, int, int]:
        t0 = time.perf_counter()
        new = prune(gm, plan, dg)
        self._time("rewrite", t0)
        return new, count_macs(new, self.cfg.example_inputs), count_params(new)

    def _trim(
        self, gm: fx.GraphModule, dg: DependencyGraph, alloc: Allocation, k: int
    ) -> tuple[Plan, fx.GraphModule, int, int]:
        """The plan of ~k units; if it overshoots the target, the smallest one that reaches it."""
        cfg = self.cfg

        def make(n: int) -> tuple[Plan, fx.GraphModule, int, int]:
            plan = alloc.plan(n)
            return (plan, *self._candidate(gm, dg, plan)) if plan else (plan, gm, -1, -1)

        best = make(k)
        if not best[0] or not self._reached(best[2], best[3]) or cfg.stop_check is not None:
            return best
        lo, hi = 1, k  # reached at hi; find the smallest n that still reaches
        while lo < hi:
            mid = (lo + hi) // 2
            cand = make(mid)
            if cand[0] and self._reached(cand[2], cand[3]):
                hi, best = mid, cand
            else:
                lo = mid + 1
        return best

    def _recover(
        self,
        before: fx.GraphModule,
        after: fx.GraphModule,
        dg: DependencyGraph,
        plan: Plan,
        ctx: ScoringContext,
    ) -> tuple[fx.GraphModule, str]:
        cfg = self.cfg
        t0 = time.perf_counter()
        notes = []
        if cfg.compensation:
            notes.append(f"compensated {compensate(before, after, dg, plan, ctx.sites)} layers")
        if cfg.fine_tune is not None:
            after = run_fine_tune(cfg.fine_tune, after, before)
            notes.append("fine_tune callback")
        elif cfg.train_loader is not None:
            distill(after, before, cfg.train_loader, steps=cfg.distill_steps, progress=cfg.progress)
            notes.append("distilled")
        self._time("recover", t0)
        return after, ", ".join(notes)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        cfg = self.cfg
        current = graph_module
        modified = False
        bar = cfg.progress(range(cfg.schedule.steps), desc="prune_channels")
        widths = None
        for t in bar:
            t0 = time.perf_counter()
            dg = analyze(current)
            widths = widths or OriginalWidths(dg)
            self._time("analyze", t0)
            groups = self._groups(dg)
            t0 = time.perf_counter()
            ctx = ScoringContext(current, dg, cfg.calibration, loss_fn=cfg.loss_fn, seed=cfg.seed + t)
            scores = cfg.importance(ctx)
            self.last_scores = scores
            self._time("score", t0)
            t0 = time.perf_counter()
            alloc = allocate(
                cfg.allocator, current, dg, groups, scores, floors=cfg.floors, widths=widths,
                example_inputs=cfg.example_inputs, batches=cfg.calibration[:2],
                cost="params" if cfg.target_macs is None and cfg.target_params is not None else "macs",
            )  # fmt: skip
            self._time("allocate", t0)
            if alloc.removable == 0:
                self.stop_reason = "no removable units left (floors reached)"
                break
            rho = cfg.schedule.rho(t)
            self.schedule_used.append(rho)
            k = max(1, math.floor(rho * alloc.removable))
            accepted, tried = False, set()
            for attempt in range(cfg.backtracks + 1):
                plan, cand, macs, params = self._trim(current, dg, alloc, k)
                n_units = sum(len(v) for v in plan.values())
                if not plan or n_units in tried:  # alignment: a smaller retry gives the same plan
                    break
                tried.add(n_units)
                cand, note = self._recover(current, cand, dg, plan, ctx)
                params = count_params(cand)
                t0 = time.perf_counter()
                verdict = cfg.budget.check(cand)
                self._time("budget", t0)
                self.steps.append(
                    StepRecord(
                        t, rho, n_units, {g: len(v) for g, v in plan.items()}, macs, params,
                        verdict.quality, verdict.consumed, verdict.ok,
                        note if verdict.ok else f"rolled back: budget {verdict.consumed:.4g} > {cfg.budget.limit}",
                    )
                )  # fmt: skip
                if verdict.ok:
                    current, modified, accepted = cand, True, True
                    break
                if attempt < cfg.backtracks and n_units > 1:
                    k = max(1, n_units // 2)
                else:
                    break
            if not accepted:
                self.stop_reason = "the next step would break the budget"
                break
            last = self.steps[-1]
            if self._reached(last.macs, last.params):
                self.stop_reason = "target reached"
                break
            if cfg.stop_check is not None and (why := cfg.stop_check(current)):
                self.stop_reason = why
                break
        else:
            self.stop_reason = f"schedule finished ({cfg.schedule.steps} steps)"
        return PassResult(current, modified)
