"""``idap_fx.optimize``: trace → analyze → score → rewrite, under a budget, with an honest report.

The options (``idap_fx.options``: ``Goal``, ``Recovery``, one ``PassOptions`` per pass) are
resolved first, so bad ones fail before any work; the passes (``idap_fx.passes.PASSES``) then
run in order on one shared ``PassContext`` and each returns a ``PassRecord`` the report is
built from. The caller's model is deep-copied by ``trace`` and never touched;
``OptimizeResult.original`` is that copy.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from idap_fx.capture.trace import trace
from idap_fx.errors import BudgetError, IdapError, OptionError
from idap_fx.method.budget import Budget
from idap_fx.method.channel_stats import batch_args
from idap_fx.method.collective import reducer
from idap_fx.metrics import count_macs, count_params
from idap_fx.options import Goal, PassOptions, Recovery, build, split_shorthands
from idap_fx.passes import PASSES
from idap_fx.passes.base import PassContext, PassRecord, run_passes
from idap_fx.report import LayerChange, OptimizeReport, layer_changes


@dataclass
class OptimizeResult:
    """The optimized GraphModule, the (traced copy of the) original, and the report."""

    model: fx.GraphModule
    original: fx.GraphModule
    report: OptimizeReport
    example_inputs: tuple[Any, ...]
    calibration: list[Any] = field(default_factory=list)  # the batches the run used (int8 calibration)
    snapshots: Any = None  # idap_fx.curve.Snapshots with keep_snapshots=True

    @property
    def plan(self) -> list[LayerChange]:
        """Per weight layer: output width before → after and share of the original MACs."""
        return [
            LayerChange(**{k: v for k, v in r.items() if k != "removed_share"}) for r in self.report.layers
        ]

    def export_onnx(self, path: str | os.PathLike[str], **kwargs: Any) -> Any:
        """Export the optimized model (see ``idap_fx.export_onnx``); ``quantize="int8"`` calibrates on
        the run's own calibration batches unless ``calibration=`` is given."""
        from idap_fx.deploy.onnx_export import export_onnx

        if kwargs.get("quantize") is not None:
            kwargs.setdefault("calibration", self.calibration or None)
        return export_onnx(self.model, self.example_inputs, path, **kwargs)

    def at(self, target_macs: float | None = None, target_params: float | None = None) -> fx.GraphModule:
        """The model a separate run with this target would return, rebuilt from the snapshots."""
        if self.snapshots is None:
            raise IdapError("at() needs optimize(..., keep_snapshots=True)")
        return self.snapshots.at(self.original, target_macs, target_params)

    @property
    def curve(self) -> list[Any]:
        """Every accepted step as a ``CurvePoint`` with ORT latency (fp32 and int8); measured once, then cached."""
        if getattr(self, "_curve", None) is None:
            from idap_fx.curve import measure_curve

            self._curve = measure_curve(self, latency=True, int8=True)
        return self._curve

    def check_latency(self, **kwargs: Any) -> Any:
        """ONNX Runtime latency, original vs optimized, in one run (see ``idap_fx.check_latency``)."""
        from idap_fx.deploy.latency import check_latency

        kwargs.setdefault("macs", (self.report.macs_before, self.report.macs_after))
        return check_latency(self.original, self.model, self.example_inputs, **kwargs)


def _batches(
    calibration: Iterable[Any] | None, example_inputs: tuple[Any, ...], gm: fx.GraphModule
) -> list[Any]:
    for j, x in enumerate(example_inputs):
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise IdapError(f"example input {j} contains NaN or Inf: give finite example inputs")
    if calibration is None:
        return [example_inputs]
    batches = list(calibration)
    if not batches:
        raise IdapError("calibration is empty: give at least one batch (or None to use example_inputs)")
    want = [n.meta["tensor_meta"] for n in gm.graph.nodes if n.op == "placeholder"]
    for i, b in enumerate(batches):
        args = batch_args(b)
        if len(args) < len(want):
            raise IdapError(f"calibration batch {i} has {len(args)} inputs, the model takes {len(want)}")
        for j, (a, w) in enumerate(zip(args, want, strict=False)):
            if not isinstance(a, torch.Tensor):
                raise IdapError(f"calibration batch {i} input {j} is a {type(a).__name__}, not a tensor")
            if a.dim() != len(w.shape) or tuple(a.shape[1:]) != tuple(w.shape[1:]) or a.dtype != w.dtype:
                raise IdapError(
                    f"calibration batch {i} input {j} has shape {tuple(a.shape)} {a.dtype}; the example input "
                    f"has {tuple(w.shape)} {w.dtype} (only the batch size may differ)"
                )
            if a.is_floating_point() and not torch.isfinite(a).all():
                raise IdapError(f"calibration batch {i} input {j} contains NaN or Inf")
    return [tuple(batch_args(b)[: len(want)]) for b in batches]


def _split_holdout(batches: list[Any], checked: bool) -> tuple[list[Any], list[Any], str | None]:
    """(scoring batches, held-out batches, note), chosen by *global* batch index.

    Under ``torch.distributed`` rank ``r`` holds global batches ``offset_r ..`` (ranks in order,
    contiguous shards), so every rank and a single process over all the batches withhold the
    same ones: global batch ``i`` is held out when ``i % 4 == 3``, or the last batch when there
    are fewer than four. Held-out batches never score. With one batch in all it serves both
    (noted); with nothing to check (``checked`` false) nothing is withheld.
    """
    if not checked:
        return batches, [], None
    offset, total = reducer().offset(len(batches))
    if total == 1:
        note = "only one calibration batch: the budget is checked on the batch used for scoring"
        return batches, batches, note
    held_ids = {i for i in range(total) if i % 4 == 3} or {total - 1}
    held = [b for i, b in enumerate(batches) if offset + i in held_ids]
    return [b for i, b in enumerate(batches) if offset + i not in held_ids], held, None


def _check_weights(gm: fx.GraphModule, fix: str = "fix the model's weights before pruning") -> None:
    """Refuse meta tensors, NaN anywhere, and ±inf in parameters or running statistics.

    Other buffers may hold ±inf: an additive attention mask is -inf where it masks.
    """
    stats = {
        id(t) for m in gm.modules() if isinstance(m, nn.modules.batchnorm._NormBase) for t in m.buffers()
    }
    weights = {id(t) for t in gm.parameters()} | stats
    for name, t in list(gm.named_parameters()) + list(gm.named_buffers()):
        if t.device.type == "meta":
            raise IdapError(
                f"{name} is on the meta device (no values): optimize needs the weights; load them "
                "first (model.to_empty(device='cpu'), then load_state_dict)"
            )
        if not t.is_floating_point():
            continue
        if torch.isnan(t).any() or (id(t) in weights and not torch.isfinite(t).all()):
            raise IdapError(f"{name} contains NaN or Inf: {fix}")


def resolve_options(
    goal: Goal | None,
    recovery: Recovery | None,
    passes: Sequence[str | PassOptions] | None,
    shorthands: dict[str, Any],
) -> tuple[Goal, Recovery, list[PassOptions]]:
    """The option objects of one run: those given, or built from the flat keywords (not both).

    ``passes`` holds pass names and / or ``PassOptions`` objects; a name gets its options from
    the keywords. Keywords for a pass that does not run are validated, then ignored.
    """
    per_class = split_shorthands(shorthands, [Goal, Recovery, *(s.options_class for s in PASSES.values())])
    goal_ = build(Goal, goal, per_class.pop(Goal, {}), "goal")
    recovery_ = build(Recovery, recovery, per_class.pop(Recovery, {}), "recovery")
    named = {
        spec.options_class: spec.options_class(**per_class.get(spec.options_class, {}))
        for spec in PASSES.values()
    }
    chosen: list[PassOptions] = []
    for p in ("prune_channels",) if passes is None else passes:
        if isinstance(p, str):
            if p not in PASSES:
                raise OptionError(f"unknown pass(es) {[p]}; available: {list(PASSES)}")
            chosen.append(named[PASSES[p].options_class])
        elif isinstance(p, PassOptions) and p.pass_name in PASSES:
            chosen.append(build(type(p), p, per_class.get(type(p), {}), f"passes[{p.pass_name}]"))
        else:
            raise OptionError(f"passes must hold pass names or PassOptions objects, got {p!r}")
    for opts in chosen:
        opts.validate_with(goal_)
    return goal_, recovery_, chosen


def _shares_parameters(model: nn.Module, caller: Any) -> bool:
    """Whether ``model`` holds any of the caller's parameter tensors."""
    if not isinstance(caller, nn.Module):
        return False
    theirs = {p.data_ptr() for p in caller.parameters()}
    return any(p.data_ptr() in theirs for p in model.parameters())


def optimize(
    traced_graph: nn.Module,
    example_inputs: Any,
    *,
    calibration: Iterable[Any] | None = None,
    goal: Goal | None = None,
    recovery: Recovery | None = None,
    passes: Sequence[str | PassOptions] | None = None,
    quiet: bool | None = None,
    seed: int = 0,
    keep_snapshots: bool = False,
    **options: Any,
) -> OptimizeResult:
    """Prune ``traced_graph`` (a GraphModule or nn.Module) toward the goal within its budget.

    ``goal`` (``Goal``: targets, budget, ``evaluate``, ``strict``), ``recovery`` (``Recovery``)
    and ``passes`` (names or ``PassOptions``, default ``("prune_channels",)``) are in
    ``idap_fx.options``; every field of them is also a flat keyword (``target_macs=0.5``,
    ``budget=0.05``, ``round_to=8``, ``max_skips=2``, ``train_loader=...``). Targets are
    fractions of the original to keep; without any, pruning continues while the budget holds.
    With ``strict`` (default) an unreached target raises ``BudgetError`` whose ``.result``
    holds the most compressed model within budget. ``keep_snapshots`` records every accepted
    step's plan (``result.at``, ``result.curve``; ``idap_fx.curve``).
    """
    goal_, recovery_, chosen = resolve_options(goal, recovery, passes, options)
    if keep_snapshots and recovery_.trains:
        raise IdapError(
            "keep_snapshots replays plans and compensation; training recovery (fine_tune / "
            "train_loader) changes every weight, so its steps cannot be replayed without model copies"
        )
    phases: dict[str, float] = {}
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    with _timed(phases, "trace"):
        original = trace(traced_graph, inputs, share_parameters=True)  # one copy of the weights fewer
    _check_weights(original)
    tau = any(getattr(o, "tau_layer", None) is not None for o in chosen)
    ctx, notes = _context(original, inputs, calibration, goal_, recovery_, seed, quiet, phases, tau)
    if keep_snapshots:
        from idap_fx.curve import Snapshots

        ctx.recorder = Snapshots(ctx, chosen)
    # The passes read their input model and build new ones (``prune`` copies what it keeps), so
    # ``working`` shares ``original``'s modules and weights; only the graph is its own.
    working = fx.GraphModule(original, copy.deepcopy(original.graph), class_name=type(original).__name__)
    runs = [PASSES[o.pass_name].pass_class(ctx, o) for o in chosen]
    with _timed(phases, "passes"), torch.random.fork_rng():  # reproducible, the caller's RNG untouched
        torch.manual_seed(seed)
        model, records = run_passes(runs, working)
    model.eval()
    if _shares_parameters(model, traced_graph):  # nothing rewritten: the result must not alias the caller's
        model = copy.deepcopy(model)
    _check_weights(model, "recovery (fine_tune callback or distillation) diverged; check its learning rate")
    report = _report(ctx, model, records, phases, notes)
    report.layers = [r.to_dict() for r in layer_changes(original, model, inputs)]
    report.options = {
        "goal": goal_.to_dict(),
        "recovery": recovery_.to_dict(),
        "passes": [{"name": o.pass_name} | o.to_dict() for o in chosen],
    }
    used = ctx.calibration + ctx.budget.holdout if calibration is not None else []
    if ctx.recorder is not None:
        ctx.recorder.steps = report.steps
    out = OptimizeResult(model, original, report, inputs, used, ctx.recorder)
    if goal_.strict and report.target_reached is False:
        err = BudgetError(
            f"target not reached ({report.stop_reason}): MACs {report.macs_ratio:.3f}, params "
            f"{report.params_ratio:.3f} of the original; the most compressed model within budget is in .result"
        )
        err.result = out
        raise err
    return out


@contextmanager
def _timed(phases: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0


def _context(
    original: fx.GraphModule,
    inputs: tuple[Any, ...],
    calibration: Iterable[Any] | None,
    goal: Goal,
    recovery: Recovery,
    seed: int,
    quiet: bool | None,
    phases: dict[str, float],
    tau_layer: bool = False,
) -> tuple[PassContext, list[str]]:
    """What the passes share: batches checked and split, the budget's baseline, the original's cost.

    Calibration batches are withheld only for the label-free deviation (a budget without
    ``evaluate``, a stage-2 ``tau_layer``, or a recovery that trains and keeps its best
    held-out state); ``evaluate`` measures on the caller's data.
    """
    checked = goal.evaluate is None and (goal.budget is not None or tau_layer or recovery.trains)
    score_batches, holdout, note = _split_holdout(_batches(calibration, inputs, original), checked)
    notes = [note] if note else []
    if not checked and goal.evaluate is None:
        notes.append(
            "no budget to check: every calibration batch scored, the output deviation was not measured"
        )
    with _timed(phases, "baseline"):
        checker = Budget(
            original, goal.budget, holdout, goal.evaluate, reduce=goal.budget_reduce, measure=checked
        )
    show = not quiet if quiet is not None else sys.stderr.isatty()
    macs0 = count_macs(original, inputs)

    def on_step(rec: dict[str, Any], total: int) -> None:  # one line per step in logs (stderr not a terminal)
        if quiet is not True and not sys.stderr.isatty():
            verdict = "accepted" if rec["accepted"] else "rolled back"
            print(
                f"idap_fx: prune step {rec['step'] + 1}/{total}: -{rec['units_removed']} units, MACs "
                f"{rec['macs'] / macs0:.3f} of original, budget used {rec['budget_consumed']:.3g}, {verdict}",
                file=sys.stderr,
                flush=True,
            )

    ctx = PassContext(
        example_inputs=inputs,
        calibration=score_batches,
        budget=checker,
        goal=goal,
        recovery=recovery,
        macs0=macs0,
        params0=count_params(original),
        seed=seed,
        progress=lambda it, **kw: tqdm(it, disable=not show, leave=True, **kw),
        on_step=on_step,
        stop_check=_latency_stop(original, inputs, goal.target_latency) if goal.target_latency else None,
    )
    return ctx, notes


def _latency_stop(
    original: fx.GraphModule, inputs: tuple[Any, ...], target_ms: float
) -> Callable[[Any], str | None]:
    def check(model: fx.GraphModule) -> str | None:
        from idap_fx.deploy.latency import check_latency

        rep = check_latency(original, model, inputs, repeats=20, warmup=3)
        if rep.optimized_median_ms <= target_ms:
            return f"latency target reached ({rep.optimized_median_ms:.2f} ms <= {target_ms} ms)"
        return None

    return check


def _report(
    ctx: PassContext,
    model: fx.GraphModule,
    records: list[PassRecord],
    phases: dict[str, float],
    notes: list[str],
) -> OptimizeReport:
    """The report from the pass records; only the final model is measured here (the original was, once)."""
    goal = ctx.goal
    macs1, params1 = count_macs(model, ctx.example_inputs), count_params(model)
    final = ctx.budget.check(model)
    for r in records:
        for k, v in r.timings.items():
            phases[k] = phases.get(k, 0.0) + v
    return OptimizeReport(
        macs_before=ctx.macs0,
        macs_after=macs1,
        params_before=ctx.params0,
        params_after=params1,
        target_macs=goal.target_macs,
        target_params=goal.target_params,
        target_reached=goal.reached(macs1, params1, ctx.macs0, ctx.params0),
        budget_kind=ctx.budget.kind,
        budget_limit=ctx.budget.limit,
        budget_consumed=final.consumed,
        quality_before=ctx.budget.baseline,
        quality_after=final.quality,
        importance=next((r.importance for r in records if r.importance), ""),
        schedule=[rho for r in records for rho in r.schedule],
        steps=[s for r in records for s in r.steps],
        removed_layers=[x for r in records for x in r.removed],
        layer_trials=[x for r in records for x in r.trials],
        stop_reason="; ".join(f"{r.name}: {r.stop_reason}" for r in records),
        timings=phases,
        frozen_ops=next((r.frozen_ops for r in records if r.frozen_ops), {}),
        notes=notes + [n for r in records for n in r.notes],
        recovery=[x for r in records for x in r.recovery],
    )
