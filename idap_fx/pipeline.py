"""The end-to-end job a deployment pipeline runs: optimize → export ONNX → check parity and latency → report.

Used by the ``idap-fx optimize`` command and by the README's demo. Every output file
(ONNX model, JSON and Markdown reports) is written atomically, and only after the
whole job succeeded; under ``torch.distributed`` only rank 0 writes.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from idap_fx.curve import ship_fastest, write_curve
from idap_fx.deploy.files import check_writable
from idap_fx.deploy.latency import check_latency
from idap_fx.deploy.onnx_export import export_onnx
from idap_fx.deploy.quantize import export_job_int8
from idap_fx.distributed import main_output
from idap_fx.optimize import OptimizeResult, optimize


@dataclass
class JobSummary:
    """Figures of one run, as printed in the final table and stored in the JSON report."""

    macs: tuple[int, int]
    params: tuple[int, int]
    onnx_bytes: tuple[int, int] | None  # None in a dry run (plan_only): nothing exported
    latency_ms: tuple[float, float] | None
    speedup: float | None
    parity_rel_error: float | None
    top1_agreement: float | None
    threads: int
    target_reached: bool | None = None
    plan_only: bool = False
    int8: dict[str, Any] | None = None  # idap_fx.deploy.quantize.QuantReport of the shipped int8 model
    sweep_point: int | None = None  # with --sweep: the curve point shipped


def top1_agreement(
    original: nn.Module, optimized: nn.Module, batches: Sequence[torch.Tensor]
) -> float | None:
    """Fraction of samples where both models' argmax agree (None for non-classifier outputs)."""
    agree = total = 0
    with torch.no_grad():
        for b in batches:
            a, o = original(b), optimized(b)
            if not (isinstance(a, torch.Tensor) and a.dim() == 2):
                return None
            agree += int((a.argmax(1) == o.argmax(1)).sum())
            total += a.shape[0]
    return agree / total if total else None


def _write_reports(
    report: str | os.PathLike[str], res: OptimizeResult, summary: JobSummary, lat: Any, quant: Any
) -> None:
    """The job's JSON report and its Markdown twin (``.md`` next to it), written by rank 0 only."""
    data = res.report.to_dict() | {"job": summary.__dict__, "latency": lat.to_dict() if lat else None}
    with main_output(report) as tmp_report:
        if tmp_report is not None:  # rank 0 (or no torch.distributed) writes; the others wait
            with open(tmp_report, "w") as f:
                json.dump(data, f, indent=2, default=str)
    md = os.path.splitext(os.fspath(report))[0] + ".md"
    with main_output(md) as tmp_md:
        if tmp_md is not None:
            with open(tmp_md, "w") as f:
                f.write(res.report.to_markdown() + "\n" + _summary_markdown(summary))
                f.write("\n" + quant.to_markdown() if quant else "")


def run_job(
    model: nn.Module,
    example_inputs: torch.Tensor,
    *,
    out: str | os.PathLike[str] | None,
    report: str | os.PathLike[str] | None,
    check_batches: Sequence[torch.Tensor] = (),
    latency: bool = True,
    opset: int | None = None,
    plan_only: bool = False,
    best_effort: bool = False,
    warnings: Sequence[str] = (),
    int8: bool = False,
    keep_fp32: Sequence[str] = (),
    sweep: bool = False,
    **optimize_kwargs: Any,
) -> tuple[OptimizeResult, JobSummary]:
    """Optimize ``model``, export it to ``out``, measure it, write the reports; return result and summary.

    ``int8``: ship a static int8 (QDQ) model, calibrated on the run's calibration data, with
    ``--budget`` as its own output-deviation budget (layers that break it stay fp32).
    ``sweep``: record every accepted step, write ``curve.csv`` / ``curve.png`` next to the
    report and ship the fastest point (int8 latency with ``int8``) within the budget.
    Output paths are validated before any work, so a bad path fails in a second.
    ``plan_only`` is a dry run: the same search (so its plan is exactly what the real run
    removes: every step re-scores the model the previous step left), but no ONNX export,
    parity or latency check and no model file; only the reports. ``best_effort`` keeps the
    most compressed model within budget when the target is out of reach (instead of
    ``BudgetError``); ``summary.target_reached`` says so. ``warnings`` (random weights,
    synthetic calibration, ...) head the reports.
    """
    for path in (out, report):
        if path is not None:
            check_writable(path)
    quiet = optimize_kwargs.get("quiet")
    if best_effort:
        optimize_kwargs["strict"] = False
    res = optimize(model, example_inputs, keep_snapshots=sweep, **optimize_kwargs)
    res.report.warnings = list(warnings)
    x = res.example_inputs
    point, points = ship_fastest(res, int8=int8, latency=latency) if sweep else (None, [])
    with tempfile.TemporaryDirectory(prefix="idap_fx_job_") as tmp:
        if plan_only:
            orig_export = opt_export = shipped = lat = quant = None
        else:
            _log("exporting ONNX (original and optimized) and checking parity", quiet)
            orig_export = export_onnx(res.original, x, os.path.join(tmp, "original.onnx"), opset=opset)
            opt_export = export_onnx(res.model, x, os.path.join(tmp, "optimized.onnx"), opset=opset)
            shipped = export_job_int8(res, tmp, opset, keep_fp32, latency) if int8 else opt_export
            quant = shipped.quantization
            if latency:
                _log("measuring ONNX Runtime latency (1 thread, original vs optimized, interleaved)", quiet)
            macs = (res.report.macs_before, res.report.macs_after)
            lat = check_latency(orig_export.path, shipped.path, x, macs=macs) if latency else None
        summary = JobSummary(
            macs=(res.report.macs_before, res.report.macs_after),
            params=(res.report.params_before, res.report.params_after),
            onnx_bytes=(orig_export.onnx_bytes, shipped.onnx_bytes) if orig_export and shipped else None,
            latency_ms=(lat.original_median_ms, lat.optimized_median_ms) if lat else None,
            speedup=lat.speedup if lat else None,
            parity_rel_error=opt_export.max_rel_error if opt_export else None,
            top1_agreement=top1_agreement(res.original, res.model, check_batches) if check_batches else None,
            threads=lat.threads if lat else 0,
            target_reached=res.report.target_reached,
            plan_only=plan_only,
            int8=quant.to_dict() if quant else None,
            sweep_point=point,
        )
        if report is not None:
            _write_reports(report, res, summary, lat, quant)
        if out is not None and shipped is not None:
            with main_output(out) as tmp_out:
                if tmp_out is not None:
                    os.replace(shipped.path, tmp_out)
    if points:  # curve.csv / curve.png next to the report, once the job succeeded
        write_curve(
            points, os.path.dirname(os.path.abspath(os.fspath(report or out))), res.report.budget_kind
        )
    return res, summary


def _log(message: str, quiet: bool | None) -> None:
    if quiet is not True:
        print(f"idap_fx: {message}", file=sys.stderr, flush=True)


def _summary_markdown(s: JobSummary) -> str:
    rows = [
        "| | original | optimized |",
        "|---|---|---|",
        f"| MACs | {s.macs[0]:,} | {s.macs[1]:,} |",
        f"| params | {s.params[0]:,} | {s.params[1]:,} |",
    ]
    if s.onnx_bytes:
        rows.append(f"| ONNX bytes | {s.onnx_bytes[0]:,} | {s.onnx_bytes[1]:,} |")
    if s.latency_ms:
        rows.append(
            f"| ORT latency (median, {s.threads} thread) | {s.latency_ms[0]:.2f} ms | {s.latency_ms[1]:.2f} ms |"
        )
        rows.append(f"| speed-up | | {s.speedup:.2f}x |")
    if s.parity_rel_error is not None:
        rows.append(f"| ONNX parity (max rel. error) | | {s.parity_rel_error:.2e} |")
    if s.top1_agreement is not None:
        rows.append(f"| top-1 agreement with original | | {100 * s.top1_agreement:.1f} % |")
    return "\n".join(rows) + "\n"


def summary_rows(s: JobSummary) -> list[list[str]]:
    """The final table's rows (label, original, optimized, ratio), as printed and as stored by the demo."""
    rows = [
        ["MACs", f"{s.macs[0] / 1e6:,.1f} M", f"{s.macs[1] / 1e6:,.1f} M", f"{s.macs[1] / s.macs[0]:.3f}"],
        [
            "params",
            f"{s.params[0] / 1e6:,.2f} M",
            f"{s.params[1] / 1e6:,.2f} M",
            f"{s.params[1] / s.params[0]:.3f}",
        ],
    ]
    if s.onnx_bytes:  # a dry run (plan) writes no model
        rows.append(
            [
                "ONNX size",
                f"{s.onnx_bytes[0] / 1e6:,.2f} MB",
                f"{s.onnx_bytes[1] / 1e6:,.2f} MB",
                f"{s.onnx_bytes[1] / s.onnx_bytes[0]:.3f}",
            ]
        )
    if s.latency_ms:
        rows.append(
            [
                f"ORT latency ({s.threads} thr, median)",
                f"{s.latency_ms[0]:.2f} ms",
                f"{s.latency_ms[1]:.2f} ms",
                f"{s.speedup:.2f}x faster",
            ]
        )
    if s.parity_rel_error is not None:
        rows.append(["ONNX parity (max rel err)", "", f"{s.parity_rel_error:.1e}", ""])
    if s.top1_agreement is not None:
        rows.append(["top-1 agreement", "", f"{100 * s.top1_agreement:.1f} %", ""])
    return rows


def summary_table(s: JobSummary, title: str = "idap_fx") -> Any:
    """The final rich table."""
    from rich.table import Table

    t = Table(title=title)
    t.add_column("")
    t.add_column("original", justify="right")
    t.add_column("optimized", justify="right")
    t.add_column("ratio", justify="right")
    for row in summary_rows(s):
        t.add_row(*row)
    return t


def plan_table(layers: Sequence[dict[str, Any]], title: str = "per-layer plan", top: int = 15) -> Any:
    """The rich per-layer table: the ``top`` pruned layers by share of the original MACs."""
    from rich.table import Table

    pruned = [r for r in layers if r["width_after"] != r["width_before"]]
    pruned.sort(key=lambda r: -(r["macs_share"] or 0.0))
    t = Table(title=f"{title}: {len(pruned)} of {len(layers)} layers narrowed (full table in the report)")
    for col in ("layer", "width before → after", "removed", "MACs share"):
        t.add_column(col, justify="left" if col == "layer" else "right")
    for r in pruned[:top]:
        share = "" if r["macs_share"] is None else f"{100 * r['macs_share']:.1f} %"
        t.add_row(
            r["module"],
            f"{r['width_before']} → {r['width_after']}",
            f"{100 * r['removed_share']:.1f} %",
            share,
        )
    return t
