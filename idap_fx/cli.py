"""The ``idap-fx`` command: ``optimize``, ``inspect`` and ``viz``.

Exit codes (for CI scripts): 0 success; 2 bad usage or input (unknown model, bad path,
bad calibration file); 3 the target cannot be reached within the budget; 4 export or
ONNX parity failure; 5 analysis/trace failure; 1 anything unexpected.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from idap_fx.errors import AnalysisError, BudgetError, ExportError, IdapError, TraceError
from idap_fx.optimize import ALLOCATOR, MIN_KEEP, ROUND_TO

EXIT_USAGE, EXIT_BUDGET, EXIT_EXPORT, EXIT_ANALYSIS, EXIT_OTHER = 2, 3, 4, 5, 1


class UsageError(IdapError):
    """Bad command-line input (model spec, file, shape)."""


def load_model(spec: str) -> nn.Module:
    """``torchvision:NAME`` (weights=None), ``timm:NAME`` (timm installed) or ``module:callable``."""
    kind, _, name = spec.partition(":")
    if not name:
        raise UsageError(f"model {spec!r}: use torchvision:NAME, timm:NAME or package.module:callable")
    if kind == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            raise UsageError(f"torchvision has no model {name!r} (see torchvision.models.list_models())")
        kw: dict[str, Any] = (
            {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
        )
        return torchvision.models.get_model(name, weights=None, **kw).eval()
    if kind == "timm":
        try:
            import timm
        except ImportError:
            raise UsageError("timm:NAME needs timm installed (pip install timm)") from None
        return timm.create_model(name, pretrained=False).eval()
    try:
        factory = getattr(importlib.import_module(kind), name)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"cannot load {spec!r}: {exc}") from exc
    model = factory()
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec} returned a {type(model).__name__}, not an nn.Module")
    return model.eval()


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-shape must look like 1,3,224,224, got {text!r}") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"--input-shape must be positive integers, got {text!r}")
    return shape


def load_calibration(path: str, shape: tuple[int, ...], batch: int = 8) -> list[torch.Tensor]:
    """Batches from a .pt / .npy tensor file (N, *shape[1:]) or a folder of images (resized, ImageNet-normalised)."""
    if not os.path.exists(path):
        raise UsageError(f"--calibration {path}: no such file or directory")
    if os.path.isdir(path):
        from PIL import Image
        from torchvision.transforms import v2

        files = sorted(f for f in os.listdir(path) if f.lower().endswith((".png", ".jpg", ".jpeg", ".bmp")))
        if not files:
            raise UsageError(f"--calibration {path}: the folder holds no .png/.jpg/.bmp images")
        tf = v2.Compose(
            [
                v2.ToImage(),
                v2.Resize(shape[-2:], antialias=True),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            ]
        )
        data = torch.stack([tf(Image.open(os.path.join(path, f)).convert("RGB")) for f in files])
    elif path.endswith(".npy"):
        data = torch.from_numpy(np.load(path)).float()
    elif path.endswith(".pt"):
        data = torch.load(path, weights_only=True)
        if not isinstance(data, torch.Tensor):
            raise UsageError(f"--calibration {path}: expected one tensor, found {type(data).__name__}")
    else:
        raise UsageError(f"--calibration {path}: give a folder of images, a .pt or a .npy file")
    if tuple(data.shape[1:]) != tuple(shape[1:]):
        raise UsageError(
            f"--calibration {path}: samples have shape {tuple(data.shape[1:])}, the model takes {shape[1:]}"
        )
    return list(data.split(batch))


def _budget(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--budget must be a number or 'none', got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="idap-fx", description="Structured pruning of PyTorch models (IDAP++ on torch.fx)."
    )
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("model", help="torchvision:NAME, timm:NAME or package.module:callable")
    common.add_argument("--input-shape", type=_shape, default=(1, 3, 224, 224), help="example input shape")
    o = sub.add_parser("optimize", parents=[common], help="prune, export ONNX, check latency, write reports")
    o.add_argument("--target-macs", type=float, help="fraction of the original MACs to keep, e.g. 0.5")
    o.add_argument("--target-params", type=float, help="fraction of the original parameters to keep")
    o.add_argument(
        "--budget", type=_budget, default=0.05, help="label-free output-deviation budget, or 'none'"
    )
    o.add_argument("--passes", default="prune_channels", help="comma-separated: prune_channels,skip_layers")
    o.add_argument("--importance", default="divergence", help="divergence, l1, bn_scale, random")
    o.add_argument("--calibration", help="folder of images, or a .pt/.npy tensor file")
    o.add_argument(
        "--round-to",
        type=int,
        default=ROUND_TO,
        help="keep widths multiples of this (fast ONNX Runtime convs)",
    )
    o.add_argument("--allocator", default=ALLOCATOR, help="global, group, cost or sensitivity")
    o.add_argument("--min-keep", type=float, default=MIN_KEEP, help="floor: fraction of each original width")
    o.add_argument("--opset", type=int, default=None)
    o.add_argument("--out", default="model.onnx", help="ONNX output path")
    o.add_argument("--report", default="report.json", help="JSON report path (a .md is written next to it)")
    o.add_argument("--no-latency", action="store_true", help="skip the ONNX Runtime latency check")
    o.add_argument("--quiet", action="store_true")
    i = sub.add_parser("inspect", parents=[common], help="print the dependency groups")
    i.add_argument("--all", action="store_true", help="list frozen groups too")
    v = sub.add_parser("viz", parents=[common], help="write the dependency-graph viewer (HTML)")
    v.add_argument("--out", default="graph.html")
    return p


def _optimize(args: argparse.Namespace) -> int:
    from rich.console import Console

    from idap_fx.pipeline import run_job, summary_table

    for path in (args.out, args.report):
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
            raise UsageError(f"cannot write {path}: {directory} is missing or not writable")
    model = load_model(args.model)
    x = torch.randn(*args.input_shape)
    cal = load_calibration(args.calibration, args.input_shape) if args.calibration else None
    res, summary = run_job(
        model,
        x,
        out=args.out,
        report=args.report,
        calibration=cal,
        target_macs=args.target_macs,
        target_params=args.target_params,
        budget=args.budget,
        passes=[p.strip() for p in args.passes.split(",") if p.strip()],
        importance=args.importance,
        round_to=args.round_to,
        allocator=args.allocator,
        min_keep=args.min_keep,
        opset=args.opset,
        latency=not args.no_latency,
        quiet=args.quiet or None,
    )
    Console().print(summary_table(summary, title=f"idap-fx optimize {args.model}"))
    print(f"wrote {args.out} and {args.report}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    import idap_fx

    gm = idap_fx.trace(load_model(args.model), torch.randn(*args.input_shape))
    dg = idap_fx.analyze(gm)
    t = Table(title=f"{args.model}: {len(dg.groups)} groups, {len(dg.prunable)} prunable")
    for col in ("group", "units", "channels", "members", "status"):
        t.add_column(col)
    for g in dg.groups:
        if g.prunable or args.all:
            status = (
                "prunable" + ("" if g.exact else f" (inexact: {g.inexact_reason})")
                if g.prunable
                else f"frozen: {g.frozen_reason}"
            )
            t.add_row(g.id, str(g.size), str(g.channels), str(len(g.members)), status)
    Console().print(t)
    for node, why in dg.boundaries.items():
        print(f"boundary {node}: {why}")
    return 0


def _viz(args: argparse.Namespace) -> int:
    import idap_fx
    from idap_fx.visualize import visualize

    gm = idap_fx.trace(load_model(args.model), torch.randn(*args.input_shape))
    path = visualize(gm, args.out, title=args.model)
    print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``idap-fx`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    handler = {"optimize": _optimize, "inspect": _inspect, "viz": _viz}[args.command]
    try:
        return handler(args)
    except UsageError as exc:
        print(f"idap-fx: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BudgetError as exc:
        print(f"idap-fx: target not reachable: {exc}", file=sys.stderr)
        return EXIT_BUDGET
    except ExportError as exc:
        print(f"idap-fx: export failed: {exc}", file=sys.stderr)
        return EXIT_EXPORT
    except (TraceError, AnalysisError) as exc:
        print(f"idap-fx: cannot analyze the model: {exc}", file=sys.stderr)
        return EXIT_ANALYSIS
    except IdapError as exc:
        print(f"idap-fx: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
