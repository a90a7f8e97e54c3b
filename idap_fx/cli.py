"""The ``idap-fx`` command: ``optimize``, ``plan`` (dry run), ``inspect`` and ``viz``.

Exit codes (for CI scripts): 0 success; 2 bad usage or input (bad option value, unknown
model, bad path, bad weights or calibration file); 3 the target cannot be reached within
the budget (nothing written); 4 export or ONNX parity failure; 5 analysis/trace failure;
6 ``--best-effort``: the target was out of reach, the most compressed model within budget
was written; 1 anything unexpected.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from idap_fx.cli_inputs import (
    UsageError,
    ensure_cwd_importable,
    leaf_module_types,
    load_calibration,
    load_model,
    synthetic_input,
)
from idap_fx.deploy.files import check_writable
from idap_fx.errors import AnalysisError, BudgetError, ExportError, IdapError, TraceError
from idap_fx.method.compensation import MODES as COMPENSATIONS
from idap_fx.options import ALLOCATOR, COMPENSATION, MIN_KEEP, ROUND_TO, Goal, PruneOptions

__all__ = ["UsageError", "load_calibration", "load_model", "main"]

EXIT_USAGE, EXIT_BUDGET, EXIT_EXPORT, EXIT_ANALYSIS, EXIT_BEST_EFFORT, EXIT_OTHER = 2, 3, 4, 5, 6, 1
DEFAULT_SHAPE = (1, 3, 224, 224)
# API names in error messages, and what to type on the command line instead.
CLI_HINTS = {
    "ignored_layers": "--ignore",
    "target_macs": "--target-macs",
    "target_params": "--target-params",
    "the most compressed model within budget is in .result": "--best-effort writes the most compressed "
    "model within budget",
}


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must look like 1,3,224,224, got {text!r}") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"must be positive integers, got {text!r}")
    return shape


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


def _fraction(text: str) -> float:
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(
            f"is the fraction of the original to keep, in (0, 1): {text} is impossible (0.5 keeps half)"
        )
    return value


def _share(text: str) -> float:
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"is a share of a layer's original width, in [0, 1]: {text} is not")
    return value


def _budget(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number or 'none', got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 or 'none', got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _choices(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [p.strip() for p in text.split(",") if p.strip()]
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"{bad or text!r}: choose from {', '.join(allowed)}")
        return names

    return parse


def _job_parser(common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options shared by ``optimize`` and ``plan``: targets, budget, passes and pruning knobs."""
    from idap_fx.method.allocate import ALLOCATORS
    from idap_fx.method.scoring import CRITERIA
    from idap_fx.passes import PASSES

    job = argparse.ArgumentParser(add_help=False, parents=[common])
    job.add_argument("--target-macs", type=_fraction, help="fraction of the original MACs to keep, e.g. 0.5")
    job.add_argument("--target-params", type=_fraction, help="fraction of the original parameters to keep")
    job.add_argument(
        "--budget", type=_budget, default=Goal().budget, help="label-free output-deviation budget, or 'none'"
    )
    job.add_argument("--passes", type=_choices(PASSES), default=["prune_channels"], help=", ".join(PASSES))
    job.add_argument("--importance", choices=sorted(CRITERIA), default=PruneOptions().importance)
    job.add_argument("--calibration", help="folder of images, a .pt/.npy tensor file, or module:function")
    job.add_argument(
        "--ignore", action="append", default=[], help="module path or class kept whole (repeatable)"
    )
    job.add_argument("--round-to", type=_positive_int, default=ROUND_TO, help="keep widths multiples of this")
    job.add_argument("--allocator", choices=sorted(ALLOCATORS), default=ALLOCATOR, help="who loses units")
    job.add_argument(
        "--compensation",
        choices=[*COMPENSATIONS, "none"],
        default=COMPENSATION,
        help="what a pruned layer's consumers absorb (no training)",
    )
    job.add_argument(
        "--min-keep", type=_share, default=MIN_KEEP, help="floor: fraction of each original width"
    )
    job.add_argument(
        "--max-prune-ratio", type=_share, default=None, help="cap: fraction any layer may lose at most"
    )
    job.add_argument(
        "--query-heads",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="grouped-query attention: remove query heads one by one, keep every key/value head "
        "(default: only where one key/value head serves them all)",
    )
    job.add_argument(
        "--best-effort", action="store_true", help="target out of reach: write the best within budget"
    )
    job.add_argument("--quiet", action="store_true")
    return job


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="idap-fx", description="Structured pruning of PyTorch models (IDAP++ on torch.fx)."
    )
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("model", help="torchvision:NAME, timm:NAME, package.module:callable or FILE.pt2")
    common.add_argument("--input-shape", type=_shape, help="example input shape (default 1,3,224,224)")
    common.add_argument(
        "--weights", help="state dict / checkpoint path, or a torchvision weight name (local cache)"
    )
    common.add_argument("--leaf-module", action="append", default=[], help="module class traced as one call")
    job = _job_parser(common)
    o = sub.add_parser("optimize", parents=[job], help="prune, export ONNX, check latency, write reports")
    o.add_argument("--opset", type=_positive_int, default=None)
    o.add_argument("--out", default="model.onnx", help="ONNX output path")
    o.add_argument("--report", default="report.json", help="JSON report path (a .md is written next to it)")
    o.add_argument("--no-latency", action="store_true", help="skip the ONNX Runtime latency check")
    o.add_argument(
        "--int8", action="store_true", help="ship static int8 ONNX (QDQ), calibrated on --calibration"
    )
    o.add_argument(
        "--keep-fp32", default="", help="with --int8: comma-separated layers (module paths) kept fp32"
    )
    o.add_argument(
        "--sweep", action="store_true", help="write curve.csv/curve.png; ship the fastest point within budget"
    )
    pl = sub.add_parser("plan", parents=[job], help="dry run: the per-layer plan, no model written")
    pl.add_argument(
        "--report", default="plan.json", help="JSON plan/report path (a .md is written next to it)"
    )
    i = sub.add_parser("inspect", parents=[common], help="print the dependency groups")
    i.add_argument("--all", action="store_true", help="list frozen groups too")
    v = sub.add_parser("viz", help="write the dependency-graph viewer, or a plan's per-layer view (HTML)")
    v.add_argument("model", nargs="?", help="as for optimize; not needed with --plan")
    v.add_argument("--input-shape", type=_shape)
    v.add_argument("--weights")
    v.add_argument("--leaf-module", action="append", default=[])
    v.add_argument("--plan", help="a report.json / plan.json written by optimize or plan")
    v.add_argument("--out", default="graph.html")
    return p


def _model(args: argparse.Namespace) -> tuple[Any, torch.Tensor, list[str]]:
    """The model (traced when --leaf-module is given), its seeded example input and the warnings."""
    import idap_fx

    loaded = load_model(args.model, args.weights)
    shape = args.input_shape or loaded.input_shape or DEFAULT_SHAPE
    args.input_shape = shape
    x = synthetic_input(shape)
    model = loaded.model
    if args.leaf_module:
        model = idap_fx.trace(model, x, leaf_modules=leaf_module_types(model, args.leaf_module))
    return model, x, loaded.warnings


def _warn(message: str) -> None:
    print(f"idap-fx: WARNING: {message}", file=sys.stderr, flush=True)


def _optimize(args: argparse.Namespace) -> int:
    from rich.console import Console

    from idap_fx.method.schedule import get_schedule
    from idap_fx.pipeline import plan_table, run_job, summary_table

    plan_only = args.command == "plan"
    out = None if plan_only else args.out
    for path in [args.report] + ([] if plan_only else [args.out]):
        try:
            check_writable(path)
        except ExportError as exc:  # a bad path is bad input (exit 2), not an export failure
            raise UsageError(str(exc)) from None
    model, x, warnings = _model(args)
    if args.calibration:
        cal = load_calibration(args.calibration, args.input_shape)
    else:
        cal = None
        warnings.append(
            "calibration data is SYNTHETIC (one seeded N(0,1) batch, no --calibration): channels are ranked "
            "on noise; pass --calibration with a few hundred real samples"
        )
    for w in warnings:
        _warn(w)
    if not args.quiet:
        todo = [f"up to {get_schedule(None).steps} prune steps (fewer once the target is reached)"]
        todo.append(f"{len(cal) if cal else 1} calibration batch(es) scored per step")
        todo += (
            [] if plan_only else ["ONNX export of 2 models"] + ([] if args.no_latency else ["latency check"])
        )
        print(f"idap-fx: {'; '.join(todo)}", file=sys.stderr, flush=True)
    res, summary = run_job(
        model,
        x,
        out=out,
        report=args.report,
        calibration=cal,
        goal=Goal(
            target_macs=args.target_macs,
            target_params=args.target_params,
            budget=args.budget,
            strict=not args.best_effort,
        ),
        passes=args.passes,
        importance=args.importance,
        round_to=args.round_to,
        ignored_layers=args.ignore,
        allocator=args.allocator,
        compensation=False if args.compensation == "none" else args.compensation,
        min_keep=args.min_keep,
        max_prune_ratio=args.max_prune_ratio,
        query_heads=args.query_heads,
        opset=getattr(args, "opset", None),
        latency=not (plan_only or args.no_latency),
        plan_only=plan_only,
        warnings=warnings,
        quiet=args.quiet or None,
        int8=getattr(args, "int8", False),  # optimize only; `plan` writes no model
        keep_fp32=[k.strip() for k in getattr(args, "keep_fp32", "").split(",") if k.strip()],
        sweep=getattr(args, "sweep", False),
    )
    console = Console()
    console.print(summary_table(summary, title=f"idap-fx {args.command} {args.model}"))
    console.print(plan_table(res.report.layers))
    for w in warnings:
        _warn(w)
    print(f"wrote {args.report}" if plan_only else f"wrote {args.out} and {args.report}")
    if summary.target_reached is False:
        print(f"idap-fx: target not reached ({res.report.stop_reason}); wrote the most compressed model within "
              f"budget: MACs {res.report.macs_ratio:.3f}, params {res.report.params_ratio:.3f}", file=sys.stderr)  # fmt: skip
        return EXIT_BEST_EFFORT
    return 0


LEGEND = (
    "units: what a plan can remove in the group (one output channel, or a whole attention head / "
    "grouped-conv position); channels: the tensor channels those units span (units x channels per unit); "
    "members: the parameter slices that lose the same units."
)


def _inspect(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    import idap_fx

    model, x, _ = _model(args)
    dg = idap_fx.analyze(idap_fx.trace(model, x))
    t = Table(title=f"{args.model}: {len(dg.groups)} groups, {len(dg.prunable)} prunable", caption=LEGEND)
    for col in ("group", "units", "channels", "members", "status"):
        t.add_column(col)
    for g in dg.groups:
        if g.prunable or args.all:
            status = (
                "prunable"
                + ("" if g.exact else f" (inexact: {g.inexact_reason})")
                + (f" (pinned: {g.pinned_reason})" if g.pinned_reason else "")
                if g.prunable
                else f"frozen: {g.frozen_reason}"
            )
            t.add_row(g.id, str(g.size), str(g.channels), str(len(g.members)), status)
    Console(width=max(120, Console().width)).print(t)
    for node, why in dg.boundaries.items():
        print(f"boundary {node}: {why}")
    return 0


def _viz(args: argparse.Namespace) -> int:
    import idap_fx
    from idap_fx.deploy.plan_page import visualize_plan
    from idap_fx.deploy.visualize import visualize

    if args.plan:
        path = visualize_plan(args.plan, args.out)
    elif args.model:
        model, x, _ = _model(args)
        path = visualize(idap_fx.trace(model, x), args.out, title=args.model)
    else:
        raise UsageError("viz needs a model, or --plan report.json")
    print(f"wrote {path}")
    return 0


def _cli_message(exc: BaseException) -> str:
    text = str(exc)
    culprit = re.search(r"inside module '[^']*' \((\w+)\)", text)
    leaf = f"--leaf-module {culprit.group(1) if culprit else 'ItsClass'}"
    text = re.sub(r"trace\(\.\.\., leaf_modules=\[\w+\]\)", leaf, text)
    for api, cli in CLI_HINTS.items():
        text = text.replace(api, cli)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``idap-fx`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    ensure_cwd_importable()
    handler = {"optimize": _optimize, "plan": _optimize, "inspect": _inspect, "viz": _viz}[args.command]
    try:
        return handler(args)
    except UsageError as exc:
        print(f"idap-fx: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BudgetError as exc:
        print(f"idap-fx: target not reachable: {_cli_message(exc)}", file=sys.stderr)
        return EXIT_BUDGET
    except ExportError as exc:
        print(f"idap-fx: export failed: {exc}", file=sys.stderr)
        return EXIT_EXPORT
    except (TraceError, AnalysisError) as exc:
        print(f"idap-fx: cannot analyze the model: {_cli_message(exc)}", file=sys.stderr)
        return EXIT_ANALYSIS
    except IdapError as exc:
        print(f"idap-fx: error: {_cli_message(exc)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
