"""The accuracy–latency curve from one ``optimize`` run: every accepted step is a point.

``optimize(..., keep_snapshots=True)`` records each accepted stage-1 step's plan and each
accepted stage-2 removal, not a copy of the model. Stage-1 compensation changes the
consumers of what a step removed: least-squares compensation (and `reconstruct`) is re-run when a step is
replayed (it is a function of the model before the step and the calibration data), and a
step stores only the parameters replaying would not reproduce (``mean`` compensation's
biases: a few KB; measured by ``Snapshots.nbytes``). Replaying the records on a fresh trace
of the original (as ``optimize`` makes its working copy) rebuilds any point with the same
weights, holding one model at a time.

``OptimizeResult.at(target_macs=t)`` rebuilds what a separate run with target ``t`` (same
options) returns: the accepted steps before the first step whose plan reaches ``t`` are
replayed, and stage 1 resumes from that step with target ``t`` (trimmed by bisection as in
any run), then stage 2 runs if it was asked for. With ``allocator="auto"`` the points follow
the allocator the run kept: ``at`` equals a separate run with that allocator. ``measure_curve`` gives MACs, params,
the in-run deviation / ``evaluate`` value, and ONNX Runtime latency (fp32, and int8 with
``int8=True``) per point; ``write_curve`` writes ``curve.csv`` and ``curve.png``.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from idap_fx.capture.shapes import record_shapes
from idap_fx.capture.trace import trace
from idap_fx.errors import BudgetError, IdapError
from idap_fx.graph.analysis import analyze
from idap_fx.method.allocate import OriginalWidths
from idap_fx.method.compensation import compensate, resolve
from idap_fx.rewrite.repeat_kv import with_query_heads
from idap_fx.rewrite.surgery import prune

__all__ = ["CurvePoint", "Snapshot", "Snapshots", "measure_curve", "ship_fastest", "write_curve"]


@dataclass
class Snapshot:
    """One accepted step: a stage-1 plan (+ the parameters recovery changed) or a stage-2 removal."""

    stage: str  # "prune_channels" or "skip_layers"
    step: int
    plan: dict[str, list[int]] | None = None
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    candidate: Any = None  # idap_fx.rewrite.skip_candidates.Candidate
    fit: torch.Tensor | None = None  # a stage-2 projection's fitted weights
    refit: str | None = None  # compensation re-run on replay ("least_squares", "reconstruct")


@dataclass
class CurvePoint:
    """One point of the curve; ``index`` 0 is the original, ``index`` i the model after i snapshots."""

    index: int
    stage: str
    macs: int
    params: int
    macs_ratio: float
    quality: float
    deviation: float
    fp32_ms: float | None = None
    int8_ms: float | None = None
    original_ms: float | None = None
    int8_deviation: float | None = None
    fp32_bytes: int | None = None
    int8_bytes: int | None = None


class Snapshots:
    """The records of one run and what replaying them needs (the run's pass context and options)."""

    def __init__(self, ctx: Any, options: list[Any]) -> None:
        self.ctx = ctx
        self.options = options
        self.inputs = ctx.example_inputs
        self.checker = ctx.budget
        self.items: list[Snapshot] = []
        self.metrics: list[tuple[int, int, float, float]] = []  # (macs, params, quality, consumed) per item
        self.steps: list[dict[str, Any]] = []  # the report's stage-1 step records (every attempt)
        self.allocator = ""  # the allocator ``auto`` kept (``at`` replays that one)

    @property
    def nbytes(self) -> int:
        """Bytes of tensors the records hold (mean-compensated biases, stage-2 fits)."""
        own = [t for s in self.items for t in [*s.params.values(), s.fit] if t is not None]
        return sum(t.numel() * t.element_size() for t in own)

    def on_prune(
        self, step: int, before: fx.GraphModule, dg: Any, plan: dict, after: fx.GraphModule, metrics: tuple
    ) -> None:
        """Stage-1 hook: the plan, and every parameter recovery changed that replaying would not redo."""
        rec = self.ctx.recovery
        mode = resolve(rec.compensation_mode, self.ctx.calibration) if rec.compensation else None
        refit = mode if mode in ("least_squares", "reconstruct") else None
        replayed = self._step(before, dg, plan, refit)
        plain = dict(replayed.named_parameters())
        changed = {
            k: v.detach().clone()
            for k, v in after.named_parameters()
            if k not in plain or plain[k].shape != v.shape or not torch.equal(plain[k], v)
        }
        plan = {g: list(v) for g, v in plan.items()}
        self.items.append(Snapshot("prune_channels", step, plan, changed, refit=refit))
        self.metrics.append(metrics)

    def on_skip(self, candidate: Any, fit: torch.Tensor | None, metrics: tuple) -> None:
        """Stage-2 hook: the removed candidate (and a projection's fit)."""
        fit = fit.detach().clone() if fit is not None else None
        self.items.append(Snapshot("skip_layers", len(self.items), candidate=candidate, fit=fit))
        self.metrics.append(metrics)

    def _step(self, before: fx.GraphModule, dg: Any, plan: dict, refit: str | None) -> fx.GraphModule:
        """``before`` pruned by ``plan``, and compensated when the run's compensation is re-run."""
        after = prune(before, plan, dg)
        if refit is not None:
            compensate(before, after, dg, plan, (), refit, self.ctx.calibration)
        return after

    def _traced(self, original: fx.GraphModule) -> fx.GraphModule:
        """``original`` traced as stage 1 analysed it (``query_heads``: key / value copies as gathers)."""
        traced = trace(original, self.inputs)
        first = self.options[0] if self.options else None
        mode = getattr(first, "query_heads", False)
        return traced if mode is False else with_query_heads(traced, single_kv_only=mode is None)

    def replay(self, original: fx.GraphModule, upto: int | None = None) -> Iterator[fx.GraphModule]:
        """The models after 0, 1, ... ``upto`` snapshots, one at a time (the previous one is dropped)."""
        current = self._traced(original)
        yield current
        shaped = False
        for s in self.items[:upto]:
            if s.stage == "prune_channels":
                current = self._step(current, analyze(current), s.plan, s.refit)
                for name, value in s.params.items():
                    owner, _, attr = name.rpartition(".")
                    setattr(current.get_submodule(owner), attr, nn.Parameter(value.clone()))
            else:
                from idap_fx.rewrite.skip_candidates import remove

                if not shaped:
                    record_shapes(current, self.inputs)
                    shaped = True
                current = remove(current, s.candidate, self.inputs, s.fit)
            yield current

    def model(self, original: fx.GraphModule, upto: int) -> fx.GraphModule:
        """The model after ``upto`` snapshots."""
        model = None
        for model in self.replay(original, upto):  # noqa: B007 (only the last is kept)
            pass
        model.eval()
        return model

    def at(self, original: fx.GraphModule, target_macs: float | None, target_params: float | None) -> Any:
        """The model a separate run with these targets returns (see the module docstring)."""
        from idap_fx.passes import PASSES

        names = [o.pass_name for o in self.options]
        if not names or names[0] != "prune_channels":
            raise IdapError(f"at() needs a run whose first pass is prune_channels (this one ran {names})")
        goal = dataclasses.replace(self.ctx.goal, target_macs=target_macs, target_params=target_params)
        if not goal.has_target:
            raise IdapError("at() needs target_macs and/or target_params")
        ctx = dataclasses.replace(self.ctx, goal=goal, recorder=None)
        passes = [PASSES[o.pass_name].pass_class(ctx, o) for o in self.options]
        cross = next((s["step"] for s in self.steps if passes[0]._reached(s["macs"], s["params"])), None)
        if cross is None:
            raise BudgetError(
                f"no step of this run reached target_macs={target_macs} target_params={target_params}; "
                "the most compressed point within budget is the run's own model"
            )
        before = sum(1 for s in self.items if s.stage == "prune_channels" and s.step < cross)
        model = self.model(original, before)
        passes[0].start_step = cross
        passes[0].allocator = self.allocator or passes[0].allocator
        passes[0].widths = OriginalWidths(analyze(self._traced(original)))  # the run's floors
        with torch.random.fork_rng():
            torch.manual_seed(self.ctx.seed)
            for p in passes:
                model = p(model).graph_module
        model.eval()
        return model


def _time(original_path: str, path: str, inputs: tuple[Any, ...]) -> tuple[float, float]:
    from idap_fx.deploy.latency import check_latency

    rep = check_latency(original_path, path, inputs, threads=1, repeats=30, warmup=5)
    return rep.original_median_ms, rep.optimized_median_ms


def measure_curve(result: Any, *, latency: bool = True, int8: bool = False) -> list[CurvePoint]:
    """Every point of ``result``'s run: MACs, params, quality; ORT latency (fp32 / int8) when asked."""
    from idap_fx.deploy.int8_layers import OrtModule
    from idap_fx.deploy.onnx_export import export_onnx
    from idap_fx.deploy.quantize import quantize_onnx

    snaps: Snapshots = result.snapshots
    if snaps is None:
        raise IdapError("the curve needs optimize(..., keep_snapshots=True)")
    inputs, checker = snaps.inputs, snaps.checker
    macs0, params0 = result.report.macs_before, result.report.params_before
    rows = [(macs0, params0, checker.baseline, 0.0)] + snaps.metrics
    stages = ["original"] + [s.stage for s in snaps.items]
    points = []
    with tempfile.TemporaryDirectory(prefix="idap_fx_curve_") as tmp:
        orig = os.path.join(tmp, "original.onnx")
        if latency or int8:
            export_onnx(result.original, inputs, orig)
        for i, model in enumerate(snaps.replay(result.original)):
            macs, params, quality, consumed = rows[i]
            p = CurvePoint(i, stages[i], macs, params, macs / macs0, quality, consumed)
            if latency or int8:
                path = os.path.join(tmp, f"p{i}.onnx")
                p.fp32_bytes = export_onnx(model.eval(), inputs, path).onnx_bytes
                if latency:
                    p.original_ms, p.fp32_ms = _time(orig, path, inputs)
                if int8:
                    q = quantize_onnx(
                        path,
                        os.path.join(tmp, f"p{i}.int8.onnx"),
                        inputs,
                        checker_batches(snaps),
                        latency=False,
                    )
                    p.int8_bytes = q.int8_bytes
                    p.int8_deviation = checker.deviation(OrtModule(q.path))
                    if latency:
                        p.int8_ms = _time(orig, q.path, inputs)[1]
            points.append(p)
    return points


def checker_batches(snaps: Snapshots) -> list[Any]:
    """The calibration batches the run scored on, then its held-out ones (int8 calibration + cost check)."""
    return list(snaps.ctx.calibration) + list(snaps.checker.holdout)


def write_curve(points: list[CurvePoint], directory: str | os.PathLike[str], kind: str) -> tuple[str, str]:
    """``curve.csv`` and ``curve.png`` (quality vs ORT latency) in ``directory``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from idap_fx.deploy.files import atomic_output

    csv_path = os.path.join(os.fspath(directory), "curve.csv")
    png_path = os.path.join(os.fspath(directory), "curve.png")
    names = [f.name for f in dataclasses.fields(CurvePoint)]
    with atomic_output(csv_path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=names)
        w.writeheader()
        w.writerows(dataclasses.asdict(p) for p in points)
    fig, ax = plt.subplots(figsize=(6, 4))
    for attr, label, dev in (("fp32_ms", "fp32", "deviation"), ("int8_ms", "int8", "int8_deviation")):
        xs = [(getattr(p, attr), getattr(p, dev)) for p in points if getattr(p, attr) is not None]
        if xs:
            ax.plot([x for x, _ in xs], [y for _, y in xs], "o-", label=label)
    ax.set_xlabel("ONNX Runtime latency, 1 thread, median (ms)")
    ax.set_ylabel(f"output deviation from the original ({kind})")
    ax.set_title("idap_fx: one run, every accepted step")
    ax.legend()
    fig.tight_layout()
    with atomic_output(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return csv_path, png_path


def ship_fastest(res: Any, *, int8: bool, latency: bool) -> tuple[int, list[CurvePoint]]:
    """Measure the curve and make ``res`` its fastest point within the budget (the most compressed
    one without latency); return the point's index and the curve."""
    points = measure_curve(res, latency=latency, int8=int8)
    limit = res.report.budget_limit if res.report.budget_kind == "output_deviation" else None
    ok = [
        p
        for p in points[1:]
        if limit is None or ((p.int8_deviation if int8 else p.deviation) or 0.0) <= limit
    ] or points[-1:]
    key = "int8_ms" if int8 else "fp32_ms"
    best = min(ok, key=lambda p: getattr(p, key)) if latency else ok[-1]
    res.model = res.snapshots.model(res.original, best.index)
    res.report.macs_after, res.report.params_after = best.macs, best.params
    res.report.notes.append(
        f"--sweep shipped curve point {best.index} of {len(points) - 1} (fastest within budget; curve.csv)"
    )
    return best.index, points
