"""Stage 1: iterative divergence-scored channel / head pruning (method notes §2).

Each step re-analyzes and re-scores the current model, removes ⌊ρ_t·U⌋ units (U = units
still removable above the floors; which ones is decided by ``idap_fx.method.allocate``: the
allocator, the floors relative to the original widths, aligned widths), recovers
(compensation, distillation or the user's callback) and checks the budget. The step that
would overshoot the MAC / parameter target is trimmed by bisection on the number of units so
the target is met, not passed by a whole step. A step that breaks the budget is rolled back
and retried at half size (``backtracks`` times) before pruning stops; the result is the most
compressed model that stayed within budget.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial

from idap_fx.passes.base import IdapPass, PassContext, PassRecord
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from idap_fx.errors import OptionError
from idap_fx.graph.analysis import analyze
from idap_fx.graph.dependency import ChannelGroup, DependencyGraph, Plan
from idap_fx.graph.ops.indexing import QUERY_HEADS
from idap_fx.method.allocate import (
    AUTO_CANDIDATES,
    Allocation,
    Floors,
    OriginalWidths,
    allocate,
)
from idap_fx.method.budget import deviation, reference_outputs
from idap_fx.method.collective import global_slice, reducer
from idap_fx.method.compensation import compensate, resolve
from idap_fx.method.recovery import PROBE_STEPS, held_out_loss, recoverability
from idap_fx.method.schedule import Schedule, get_schedule
from idap_fx.method.scoring import Importance, Scores, ScoringContext, get_importance
from idap_fx.metrics import count_macs, count_params, fingerprint
from idap_fx.options import PruneOptions
from idap_fx.rewrite.repeat_kv import with_query_heads
from idap_fx.rewrite.surgery import discard, prune, return_free_memory


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


def resolve_ignored(gm: fx.GraphModule, ignored_layers: Sequence[str | type[nn.Module]]) -> dict[str, str]:
    """Module paths to keep whole, each with the ``ignored_layers`` entry that named it."""
    modules = {n: m for n, m in gm.named_modules() if n}
    out: dict[str, str] = {}
    for entry in ignored_layers:
        if isinstance(entry, type):
            hits = [n for n, m in modules.items() if isinstance(m, entry)]
        else:
            hits = [n for n in modules if n == entry or n.startswith(f"{entry}.")]
            hits = hits or [n for n, m in modules.items() if type(m).__name__ == entry]
        if not hits:
            close = difflib.get_close_matches(str(entry), list(modules), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise OptionError(f"ignored_layers: no module named or of type {entry!r} in the model{hint}")
        out |= {n: str(getattr(entry, "__name__", entry)) for n in hits}
    return out


class PruneChannels(IdapPass):
    """The stage-1 pass: call(gm) returns the most compressed model found within budget."""

    name = "prune_channels"
    options_class = PruneOptions

    def __init__(self, ctx: PassContext, options: PruneOptions | None = None) -> None:
        super().__init__(ctx, options)
        self.opts: PruneOptions = self.options  # type: ignore[assignment]
        goal = ctx.goal
        self.importance: Importance = get_importance(self.opts.importance)
        self.schedule: Schedule = get_schedule(
            self.opts.schedule, final=1 - math.sqrt(goal.target_macs or goal.target_params or 0.25)
        )
        self.floors = Floors(
            self.opts.min_keep, self.opts.min_channels, self.opts.round_to, self.opts.max_prune_ratio
        )
        self.record.importance = getattr(self.importance, "name", type(self.importance).__name__)
        self.last_scores: Scores = {}
        self.start_step = 0  # schedule index to start at (idap_fx.curve resumes a replayed run there)
        self.widths: OriginalWidths | None = None  # the floors are fractions of these (the input's widths)
        self.allocator = "" if self.opts.allocator == "auto" else self.opts.allocator  # the one running

    def _reached(self, macs: int, params: int) -> bool:
        return bool(self.ctx.goal.reached(macs, params, self.ctx.macs0, self.ctx.params0))

    def _groups(self, dg: DependencyGraph, ignored: dict[str, str]) -> list[ChannelGroup]:
        out = []
        for g in dg.prunable:
            hit = [m.param.rpartition(".")[0] for m in g.members if m.param.rpartition(".")[0] in ignored]
            if hit:
                note = f"ignored_layers: group {g.id} not pruned (holds {hit[0]}, {ignored[hit[0]]})"
                if note not in self.record.notes:
                    self.record.notes.append(note)
            elif g.exact or self.opts.prune_inexact:
                out.append(g)
        return out

    def _candidate(
        self, gm: fx.GraphModule, dg: DependencyGraph, plan: Plan
    ) -> tuple[fx.GraphModule, int, int]:
        with self.timed("rewrite"):
            new = prune(gm, plan, dg)
        return new, count_macs(new, self.ctx.example_inputs), count_params(new)

    def _trim(
        self, gm: fx.GraphModule, dg: DependencyGraph, alloc: Allocation, k: int
    ) -> tuple[Plan, fx.GraphModule, int, int]:
        """The plan of ~k units; if it overshoots the target, the smallest one that reaches it.

        The bisection keeps plans, not models: one candidate model is alive at a time, and the
        chosen plan is rebuilt at the end (one more rewrite, no extra copy of the weights).
        """

        def size(n: int) -> tuple[Plan, int, int]:
            plan = alloc.plan(n)
            if not plan:
                return plan, -1, -1
            model, macs, params = self._candidate(gm, dg, plan)
            discard(model)  # freed on return
            return plan, macs, params

        plan = alloc.plan(k)
        if not plan:
            return plan, gm, -1, -1
        best = (plan, *self._candidate(gm, dg, plan))
        if not self._reached(best[2], best[3]) or self.ctx.stop_check is not None:
            return best
        chosen = (best[0], best[2], best[3])  # drop the model; keep what rebuilds it
        discard(best[1])
        del best
        lo, hi = 1, k  # reached at hi; find the smallest n that still reaches
        while lo < hi:
            mid = (lo + hi) // 2
            plan, macs, params = size(mid)
            if plan and self._reached(macs, params):
                hi, chosen = mid, (plan, macs, params)
            else:
                lo = mid + 1
        chosen = self._closer(gm, dg, alloc, hi, chosen)
        return chosen[0], self._candidate(gm, dg, chosen[0])[0], chosen[1], chosen[2]

    def _closer(
        self, gm: fx.GraphModule, dg: DependencyGraph, alloc: Allocation, n: int, best: tuple[Plan, int, int]
    ) -> tuple[Plan, int, int]:
        """When aligned chunks overshoot the target by more than 3 %, a neighbouring plan that lands closer."""
        goal, use_macs = self.ctx.goal, self.ctx.goal.target_macs is not None
        at = 1 if use_macs else 2
        target = (goal.target_macs if use_macs else goal.target_params) * (
            self.ctx.macs0 if use_macs else self.ctx.params0
        )
        if best[at] >= target * 0.97:
            return best
        for plan in alloc.alternatives(n):
            _, macs, params = self._candidate(gm, dg, plan)
            if self._reached(macs, params) and (macs, params)[at - 1] > best[at]:
                best = (plan, macs, params)
        return best

    def _recover(
        self,
        before: fx.GraphModule,
        after: fx.GraphModule,
        dg: DependencyGraph,
        plan: Plan,
        ctx: ScoringContext,
    ) -> tuple[fx.GraphModule, str]:
        rec = self.ctx.recovery
        notes = []
        with self.timed("recover"):
            if rec.compensation:
                mode = resolve(rec.compensation_mode, ctx.batches)
                n = compensate(before, after, dg, plan, ctx.sites, mode, ctx.batches)
                notes.append(f"compensated {n} layers ({mode})")
            after, note = self.train_recovery(after, before, len(self.record.steps))
            notes += [note] if note else []
        return after, ", ".join(notes)

    def _scores(self, current: fx.GraphModule, dg: DependencyGraph, t: int) -> tuple[Scores, ScoringContext]:
        with self.timed("score"):
            ctx = ScoringContext(
                current, dg, self.ctx.calibration, loss_fn=self.opts.loss_fn, seed=self.ctx.seed + t
            )
            scores = self.importance(ctx)
            self.last_scores = scores
        return scores, ctx

    def _allocate(
        self, current: fx.GraphModule, dg: DependencyGraph, groups: list[ChannelGroup], scores: Scores
    ) -> Allocation:
        goal = self.ctx.goal
        with self.timed("allocate"):
            return allocate(
                self.allocator, current, dg, groups, scores, floors=self.floors, widths=self.widths,
                example_inputs=self.ctx.example_inputs, batches=self.probe_batches,
                cost="params" if goal.target_macs is None and goal.target_params is not None else "macs",
            )  # fmt: skip

    def _step(
        self,
        t: int,
        rho: float,
        current: fx.GraphModule,
        dg: DependencyGraph,
        alloc: Allocation,
        sctx: ScoringContext,
    ) -> fx.GraphModule | None:
        """One step of the schedule: the accepted candidate, or None when every retry broke the budget."""
        budget = self.ctx.budget
        k = max(1, math.floor(rho * alloc.removable))
        tried: set[int] = set()
        for attempt in range(self.opts.backtracks + 1):
            plan, cand, macs, _ = self._trim(current, dg, alloc, k)
            n_units = sum(len(v) for v in plan.values())
            if not plan or n_units in tried:  # alignment: a smaller retry gives the same plan
                if attempt == 0:
                    self.record.stop_reason = f"a step of {k} units removes none once widths are aligned"
                return None
            tried.add(n_units)
            cand, note = self._recover(current, cand, dg, plan, sctx)
            with self.timed("budget"):
                verdict = budget.check(cand)
            self.record.steps.append(asdict(StepRecord(
                t, rho, n_units, {g: len(v) for g, v in plan.items()}, macs, count_params(cand),
                verdict.quality, verdict.consumed, verdict.ok,
                note if verdict.ok else f"rolled back: budget {verdict.consumed:.4g} > {budget.limit}",
            )))  # fmt: skip
            if self.ctx.on_step is not None:
                self.ctx.on_step(self.record.steps[-1], self.schedule.steps)
            if verdict.ok:
                if self.ctx.recorder is not None:
                    last = self.record.steps[-1]
                    metrics = (last["macs"], last["params"], last["quality"], last["budget_consumed"])
                    self.ctx.recorder.on_prune(t, current, dg, plan, cand, metrics)
                return cand
            discard(cand)  # rolled back
            if attempt == self.opts.backtracks or n_units <= 1:
                return None
            k = max(1, n_units // 2)
        return None

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        # the first two scoring batches by global index (what one process holding them all would use)
        self.probe_batches, self.batch_count = global_slice(self.ctx.calibration, 0, 2)
        if self.allocator:
            return self._run(graph_module)
        return self._auto(graph_module)

    def _auto(self, graph_module: fx.GraphModule) -> PassResult:
        """``allocator="auto"``: one run per candidate allocator, the best result kept.

        Best = reached the goal (else: the most compressed), then the best quality after a
        short distillation probe (``recovery.recoverability``; the one-shot quality when there
        is no data to probe with), measured on data no allocator looked at (``_selection``).
        Only the kept run's steps stay in the record and the snapshots. Candidate runs recover
        by compensation only; when recovery trains, the kept allocator runs once more with
        training (one trained run, not three).
        """
        one_shot, probe, where = self._selection(graph_module)
        recorder, ctx = self.ctx.recorder, self.ctx
        if ctx.recovery.trains:
            light = dataclasses.replace(ctx.recovery, fine_tune=None, train_loader=None)
            self.ctx = dataclasses.replace(ctx, recovery=light)
        shared, best, tried = self.record, None, []
        measured: dict[str, tuple[str, float, float, int, int]] = {}  # fingerprint -> first run's figures
        for name in AUTO_CANDIDATES:
            self.allocator, self.widths = name, None
            self.record = PassRecord(shared.name, timings=shared.timings, importance=shared.importance)
            start = len(recorder.items) if recorder is not None else 0
            result = self._run(graph_module)
            with self.timed("auto"):
                same = measured.get(model_id := fingerprint(result.graph_module))
                if same is None:  # a run that built the same model as an earlier one is not measured again
                    dev = one_shot(result.graph_module)
                    learnt = probe(result.graph_module) if probe is not None else dev
                    macs = count_macs(result.graph_module, self.ctx.example_inputs)
                    same = measured[model_id] = (name, dev, learnt, macs, count_params(result.graph_module))
                first, dev, learnt, macs, params = same
            reached = self._reached(macs, params)
            key = (not reached, 0 if reached else macs, learnt, dev)
            kept: tuple[list, list] = ([], [])
            if recorder is not None:
                kept = (recorder.items[start:], recorder.metrics[start:])
                del recorder.items[start:], recorder.metrics[start:]
            shown = f"{dev:.4g} → {learnt:.4g}" if probe is not None else f"{dev:.4g}"
            shown += f", the same model as {first}" if first != name else ""
            tried.append(f"{name} {shown} (MACs {macs / max(self.ctx.macs0, 1):.3f})")
            if best is None or key < best[0]:
                if best is not None and best[2].graph_module is not graph_module:
                    discard(best[2].graph_module)
                best = (key, name, result, self.record, kept)
            elif result.graph_module is not graph_module:
                discard(result.graph_module)
        assert best is not None
        _, name, result, record, (items, metrics) = best
        self.allocator, self.ctx = name, ctx
        if ctx.recovery.trains:  # the kept allocator again, now with the training recovery
            self.widths, self.record = (
                None,
                PassRecord(shared.name, timings=shared.timings, importance=shared.importance),
            )
            result, record = self._run(graph_module), self.record
        if recorder is not None:
            recorder.items += items
            recorder.metrics += metrics
            recorder.allocator = name
        self.record = record
        rerun = (
            "; candidates ran without training recovery, the kept one again with it"
            if ctx.recovery.trains
            else ""
        )
        record.notes.append(
            f"allocator auto: kept {name}; {where} of each candidate run: {', '.join(tried)}{rerun}"
        )
        return result

    def _selection(
        self, graph_module: fx.GraphModule
    ) -> tuple[Callable[[nn.Module], float], Callable[[nn.Module], float] | None, str]:
        """What ``auto`` ranks candidate runs by (lower is better): (one-shot measure, probe, report text).

        Measured on data no allocator looked at: the budget's held-out batches (or its
        ``evaluate``) when it measures, else the calibration batches after the first two
        (``sensitivity`` probes those two), or all of them when there are no more. The probe
        distils each candidate briefly on the first two calibration batches and measures it on
        the selection data (``evaluate``, else distillation's own held-out loss); without
        selection data apart from those batches there is no probe.
        """
        budget, calibration = self.ctx.budget, self.ctx.calibration
        rest = global_slice(calibration, 2)[0] if self.batch_count > 2 else calibration
        if budget.measure:
            one_shot, held, where = budget.held_out, budget.holdout, "the budget's held-out measure"
        else:
            reference = reference_outputs(graph_module, rest)
            one_shot, held, where = (
                (lambda m: deviation(reference, m, rest)),
                rest,
                "output deviation on calibration batches",
            )
        # with one calibration batch in all, the budget checks the batch that scores: nothing apart
        shared = any(h is c for h in budget.holdout for c in calibration)
        overlap = reducer().all_sum([float(shared)])[0] > 0
        held_apart = budget.evaluate is not None or (
            reducer().offset(len(budget.holdout))[1] > 0 and not overlap
            if budget.measure
            else self.batch_count > 2
        )
        train = reducer().gather(self.probe_batches)  # every rank probes on the same batches
        if not train or not held_apart:
            return one_shot, None, where
        after = budget.held_out if budget.evaluate is not None else held_out_loss(graph_module, held)
        probe = partial(recoverability, teacher=graph_module, train=train, measure=after, seed=self.ctx.seed)
        return (
            one_shot,
            probe,
            f"{where} → held-out distillation loss after a {PROBE_STEPS}-step distillation probe",
        )

    def _query_heads(self, graph_module: fx.GraphModule) -> fx.GraphModule:
        """The graph stage 1 analyses: ``repeat_kv`` copies as gathers where ``query_heads`` asks."""
        mode, notes = self.opts.query_heads, self.record.notes
        if mode is False:
            return graph_module
        current = with_query_heads(graph_module, single_kv_only=mode is None)
        if mode is None and current is not graph_module:
            notes.append(
                "query_heads (auto): one key / value head serves every query head (multi-query "
                "attention); query heads are removed one by one, the key / value head stays"
            )
        elif (
            mode
            and current is graph_module
            and not any(n.meta.get(QUERY_HEADS) for n in graph_module.graph.nodes)
        ):
            notes.append(
                "query_heads: no repeat_kv (expand + reshape of key / value heads) found; "
                "heads, if any, are removed with their key / value head"
            )
        return current

    def _run(self, graph_module: fx.GraphModule) -> PassResult:
        current, modified, record = self._query_heads(graph_module), False, self.record
        steps = self.schedule.steps
        ignored = resolve_ignored(graph_module, self.opts.ignored_layers)
        bar = self.ctx.progress(range(self.start_step, steps), desc=f"prune_channels ({self.allocator})")
        for t in bar:
            with self.timed("analyze"):
                dg = analyze(current)
            if self.widths is None:
                self.widths = OriginalWidths(dg)
            if t == 0:
                record.frozen_ops = dict(dg.boundaries)
            groups = self._groups(dg, ignored)
            scores, sctx = self._scores(current, dg, t)
            alloc = self._allocate(current, dg, groups, scores)
            if alloc.removable == 0:
                record.stop_reason = "no removable units left (floors reached)"
                break
            rho = self.schedule.rho(t)
            record.schedule.append(rho)
            accepted = self._step(t, rho, current, dg, alloc, sctx)
            if accepted is None:
                record.stop_reason = record.stop_reason or "the next step would break the budget"
                break
            if current is not graph_module:  # a step's model of ours, replaced: not the pass's input
                discard(current)
            current, modified = accepted, True
            return_free_memory()
            last = record.steps[-1]
            if self._reached(last["macs"], last["params"]):
                record.stop_reason = "target reached"
                break
            if self.ctx.stop_check is not None and (why := self.ctx.stop_check(current)):
                record.stop_reason = why
                break
        else:
            record.stop_reason = f"schedule finished ({steps} steps)"
        if hasattr(bar, "set_postfix_str"):  # a terminal bar says why it stopped before its total
            bar.set_postfix_str(record.stop_reason)
        return PassResult(current, modified)
