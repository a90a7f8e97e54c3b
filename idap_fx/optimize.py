"""``idap_fx.optimize``: trace → analyze → score → rewrite, under a budget, with an honest report.

The passes named in ``passes`` run in order under ``torch.fx.passes.infra``'s
``PassManager`` (each a ``PassBase`` with requires / call / ensures). The caller's model
is deep-copied by ``trace`` and never touched; ``OptimizeResult.original`` is that copy.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_manager import PassManager
from tqdm.auto import tqdm

from idap_fx.allocate import ALLOCATORS, Floors
from idap_fx.analysis import analyze
from idap_fx.budget import Budget
from idap_fx.errors import BudgetError, IdapError
from idap_fx.metrics import count_macs, count_params
from idap_fx.report import OptimizeReport
from idap_fx.schedule import Schedule, get_schedule
from idap_fx.scoring import Importance, get_importance
from idap_fx.stats import batch_args
from idap_fx.trace import trace

PASSES = ("prune_channels", "skip_layers")
ALLOCATOR = "group"  # defaults chosen by measurement: docs/architecture.md, "Allocation"
MIN_KEEP = 0.25
ROUND_TO = 8


@dataclass
class OptimizeResult:
    """The optimized GraphModule, the (traced copy of the) original, and the report."""

    model: fx.GraphModule
    original: fx.GraphModule
    report: OptimizeReport
    example_inputs: tuple[Any, ...]

    def export_onnx(self, path: str | os.PathLike[str], **kwargs: Any) -> Any:
        """Export the optimized model (see ``idap_fx.export_onnx``)."""
        from idap_fx.export import export_onnx

        return export_onnx(self.model, self.example_inputs, path, **kwargs)

    def check_latency(self, **kwargs: Any) -> Any:
        """ONNX Runtime latency, original vs optimized, in one run (see ``idap_fx.check_latency``)."""
        from idap_fx.latency import check_latency

        kwargs.setdefault("macs", (self.report.macs_before, self.report.macs_after))
        return check_latency(self.original, self.model, self.example_inputs, **kwargs)


def _fraction(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        raise BudgetError(f"{name} must be a fraction of the original in (0, 1), got {value!r}")
    if not 0 < value < 1:
        raise BudgetError(
            f"{name}={value} is impossible: give the fraction of the original to keep, in (0, 1)"
        )
    return float(value)


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


def _split_holdout(batches: list[Any]) -> tuple[list[Any], list[Any], str | None]:
    """Every 4th batch is held out for the budget check (at least one); one batch serves both."""
    if len(batches) == 1:
        return (
            batches,
            batches,
            "only one calibration batch: the budget is checked on the batch used for scoring",
        )
    held = [b for i, b in enumerate(batches) if i % 4 == 3] or [batches[-1]]
    ids = {id(b) for b in held}
    return [b for b in batches if id(b) not in ids], held, None


def _check_weights(gm: fx.GraphModule, fix: str = "fix the model's weights before pruning") -> None:
    for name, t in list(gm.named_parameters()) + list(gm.named_buffers()):
        if t.device.type == "meta":
            raise IdapError(
                f"{name} is on the meta device (no values): optimize needs the weights; load them "
                "first (model.to_empty(device='cpu'), then load_state_dict)"
            )
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise IdapError(f"{name} contains NaN or Inf: {fix}")


def optimize(
    traced_graph: nn.Module,
    example_inputs: Any,
    *,
    calibration: Iterable[Any] | None = None,
    target_macs: float | None = None,
    target_params: float | None = None,
    target_latency: float | None = None,
    budget: float | None = 0.05,
    evaluate: Callable[[nn.Module], float] | None = None,
    fine_tune: Callable[[nn.Module, nn.Module], Any] | None = None,
    train_loader: Iterable[Any] | None = None,
    distill_steps: int | None = None,
    passes: Sequence[str] | None = None,
    importance: str | Importance = "divergence",
    schedule: str | Schedule | None = None,
    allocator: str = ALLOCATOR,
    min_keep: float = MIN_KEEP,
    max_prune_ratio: float | Mapping[str, float] | None = None,
    min_channels: int = 1,
    round_to: int = ROUND_TO,
    prune_inexact: bool = False,
    compensation: bool = True,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    max_skips: int = 5,
    tau_layer: float | None = None,
    skip_projection: bool = False,
    quiet: bool | None = None,
    strict: bool = True,
    seed: int = 0,
) -> OptimizeResult:
    """Prune ``traced_graph`` (a GraphModule or nn.Module) toward the targets within ``budget``.

    Targets are fractions of the original to keep (``target_macs=0.5``: half the MACs);
    ``target_latency`` is in milliseconds of ONNX Runtime CPU latency. ``allocator``, ``min_keep``
    (floor: fraction of each group's original width), ``max_prune_ratio`` (a float, or module name /
    type name → ratio) and ``round_to`` (kept widths' multiple) decide which units go (``idap_fx.allocate``).
    Without any target,
    pruning continues while the budget holds. With ``strict`` (default) an unreached target
    raises ``BudgetError`` whose ``.result`` holds the most compressed model within budget.
    """
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    gm = trace(traced_graph, inputs)
    phases["trace"] = time.perf_counter() - t0
    _check_weights(gm)
    target_macs = _fraction("target_macs", target_macs)
    target_params = _fraction("target_params", target_params)
    if target_latency is not None and not (isinstance(target_latency, (int, float)) and target_latency > 0):
        raise IdapError(f"target_latency must be a positive number of milliseconds, got {target_latency!r}")
    names = tuple(passes) if passes is not None else ("prune_channels",)
    unknown = [p for p in names if p not in PASSES]
    if unknown:
        raise IdapError(f"unknown pass(es) {unknown}; available: {list(PASSES)}")
    no_goal = budget is None and target_macs is None and target_params is None and target_latency is None
    if no_goal and "prune_channels" in names:  # stage 2 alone is bounded by max_skips
        raise IdapError(
            "nothing to aim for: give a target (target_macs / target_params / target_latency) or a budget"
        )
    if allocator not in ALLOCATORS:
        raise IdapError(f"allocator must be one of {list(ALLOCATORS)}, got {allocator!r}")
    floors = Floors(min_keep, min_channels, round_to, max_prune_ratio)
    batches = _batches(calibration, inputs, gm)
    score_batches, holdout, note = _split_holdout(batches)
    notes = [note] if note else []
    original = gm
    working = trace(gm, inputs)  # a second copy: the passes never touch ``original``
    t0 = time.perf_counter()
    checker = Budget(original, budget, holdout, evaluate)
    phases["baseline"] = time.perf_counter() - t0
    macs0, params0 = count_macs(original, inputs), count_params(original)
    show = not quiet if quiet is not None else sys.stderr.isatty()

    def progress(it: Iterable[Any], **kw: Any) -> Iterable[Any]:
        return tqdm(it, disable=not show, leave=False, **kw)

    stop_check = None
    if target_latency is not None:
        stop_check = _latency_stop(original, inputs, target_latency)
    from idap_fx.passes.prune_channels import PruneChannels, PruneConfig

    pass_objs = []
    crit = get_importance(importance)
    for name in names:
        if name == "prune_channels":
            cfg = PruneConfig(
                example_inputs=inputs,
                calibration=score_batches,
                budget=checker,
                schedule=get_schedule(schedule, final=1 - math.sqrt(target_macs or target_params or 0.25)),
                importance=crit,
                macs0=macs0,
                params0=params0,
                target_macs=target_macs,
                target_params=target_params,
                floors=floors,
                allocator=allocator,
                prune_inexact=prune_inexact,
                compensation=(fine_tune is None and train_loader is None)
                if compensation is None
                else compensation,
                fine_tune=fine_tune,
                train_loader=train_loader,
                distill_steps=distill_steps,
                loss_fn=loss_fn,
                seed=seed,
                progress=progress,
                stop_check=stop_check,
            )
            pass_objs.append(PruneChannels(cfg))
        else:
            from idap_fx.passes.skip_layers import SkipConfig, SkipLayers

            pass_objs.append(
                SkipLayers(
                    SkipConfig(
                        example_inputs=inputs,
                        calibration=score_batches,
                        budget=checker,
                        max_skips=max_skips,
                        tau_layer=tau_layer,
                        kinds=("residual", "identity", "projection")
                        if skip_projection
                        else ("residual", "identity"),
                        fine_tune=fine_tune,
                        train_loader=train_loader,
                        distill_steps=distill_steps,
                        progress=progress,
                    )
                )
            )
    t0 = time.perf_counter()
    try:
        with (
            torch.random.fork_rng()
        ):  # reproducible (adapter init, shuffles) without touching the caller's RNG
            torch.manual_seed(seed)
            result = PassManager(passes=pass_objs)(working)
    except Exception as exc:  # PassManager wraps every failure in a bare Exception: surface the real one
        raise (exc.__cause__ if isinstance(exc.__cause__, Exception) else exc) from None
    finally:
        phases["passes"] = time.perf_counter() - t0
    model = result.graph_module
    model.eval()
    _check_weights(model, "recovery (fine_tune callback or distillation) diverged; check its learning rate")
    report = _report(
        original, model, inputs, pass_objs, checker, crit, phases, notes, target_macs, target_params
    )
    report.frozen_ops = dict(analyze(original).boundaries)
    out = OptimizeResult(model, original, report, inputs)
    if strict and report.target_reached is False:
        err = BudgetError(
            f"target not reached ({report.stop_reason}): MACs {report.macs_ratio:.3f}, params "
            f"{report.params_ratio:.3f} of the original; the most compressed model within budget is in .result"
        )
        err.result = out
        raise err
    return out


def _latency_stop(
    original: fx.GraphModule, inputs: tuple[Any, ...], target_ms: float
) -> Callable[[Any], str | None]:
    def check(model: fx.GraphModule) -> str | None:
        from idap_fx.latency import check_latency

        rep = check_latency(original, model, inputs, repeats=20, warmup=3)
        if rep.optimized_median_ms <= target_ms:
            return f"latency target reached ({rep.optimized_median_ms:.2f} ms <= {target_ms} ms)"
        return None

    return check


def _report(
    original: fx.GraphModule,
    model: fx.GraphModule,
    inputs: tuple[Any, ...],
    pass_objs: list[Any],
    checker: Budget,
    crit: Importance,
    phases: dict[str, float],
    notes: list[str],
    target_macs: float | None,
    target_params: float | None,
) -> OptimizeReport:
    macs0, macs1 = count_macs(original, inputs), count_macs(model, inputs)
    params0, params1 = count_params(original), count_params(model)
    final = checker.check(model)
    steps, schedule_used, removed, trials, stops = [], [], [], [], []
    for p in pass_objs:
        steps += [asdict(s) for s in getattr(p, "steps", [])]
        schedule_used += getattr(p, "schedule_used", [])
        removed += getattr(p, "removed", [])
        trials += getattr(p, "trials", [])
        stops.append(f"{type(p).__name__}: {p.stop_reason}")
        for k, v in p.timings.items():
            phases[k] = phases.get(k, 0.0) + v
    reached = None
    if target_macs is not None or target_params is not None:
        tol = 0.03
        reached = (target_macs is None or macs1 <= target_macs * macs0 * (1 + tol)) and (
            target_params is None or params1 <= target_params * params0 * (1 + tol)
        )
    return OptimizeReport(
        macs_before=macs0,
        macs_after=macs1,
        params_before=params0,
        params_after=params1,
        target_macs=target_macs,
        target_params=target_params,
        target_reached=reached,
        budget_kind=checker.kind,
        budget_limit=checker.limit,
        budget_consumed=final.consumed,
        quality_before=checker.baseline,
        quality_after=final.quality,
        importance=getattr(crit, "name", type(crit).__name__),
        schedule=schedule_used,
        steps=steps,
        removed_layers=removed,
        layer_trials=trials,
        stop_reason="; ".join(stops),
        timings=phases,
        frozen_ops={},
        notes=notes,
    )
