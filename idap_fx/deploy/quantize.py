"""Static int8 ONNX (QDQ) in the same job as pruning, with what it costs measured, not assumed.

``export_int8`` exports the fp32 model with ``export_onnx`` (so the fp32 graph is verified
against torch first), runs ONNX Runtime's pre-processing (``quant_pre_process``: shape
inference + graph optimisation) and ``quantize_static`` in QDQ format with per-channel
symmetric int8 weights and asymmetric uint8 activations (U8S8: ONNX Runtime's fast x86 kernels;
as accurate as int8 activations and 2-3x faster on ResNet-50 / MobileNetV2, ``docs/edge.md``;
``activations="int8"`` for S8S8), calibrated (MinMax) on the calibration batches. The fp32 parity check cannot hold
for int8, so the report gives the accuracy cost instead: the relative output deviation
Σ‖y_fp32 − y_int8‖² / Σ‖y_fp32‖² and top-1 agreement on *held-out* batches (every 4th
calibration batch, as the pruning budget uses), or the user's ``evaluate`` on both models;
plus file sizes and ONNX Runtime latency (1 thread, interleaved, median: ``check_latency``).

Layers: ``keep_fp32`` names ONNX nodes or torch module paths (``features.0.0`` matches
``/features/features.0/features.0.0/Conv``) left in fp32. With ``max_deviation`` the
deviation is a budget: when int8 breaks it, every quantized weight layer's sensitivity is
measured (the relative error of its output in the int8 model minus that of its input, on
the held-out batches) and the most sensitive layers stay fp32 (1, 2, 4, ... of them) until
the budget holds. Local errors do not always predict the output's (a layer that averages its
input noise away looks harmless while its output's quantization dominates); when that ranking
never fits, each layer is ranked by the measured output deviation with it alone kept fp32
(one quantization per layer), and the same doubling runs again. Weight-bearing ops ONNX Runtime cannot quantize raise ``IdapError``
(name them in ``keep_fp32`` to ship them in fp32); nothing is written unless all succeeds.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import onnx
import torch
from torch import nn

from idap_fx.deploy.files import atomic_output
from idap_fx.deploy.int8_layers import (
    COMPUTE_OPS,
    OrtModule,
    output_agreement,
    output_deviation,
    protect,
    quantize_qdq,
    run_outputs,
)
from idap_fx.deploy.onnx_export import ExportReport, export_onnx
from idap_fx.errors import IdapError

__all__ = ["OrtModule", "QuantReport", "export_int8", "export_job_int8", "quantize_onnx", "split_holdout"]

ACTIVATIONS = ("uint8", "int8")  # uint8 first: as accurate as int8 and 2-3x faster on x86 (docs/edge.md)
_WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN", "Einsum", "Gather")


@dataclass
class QuantReport:
    """fp32 vs int8: size, ORT latency and the accuracy cost on held-out batches."""

    path: str
    fp32_bytes: int
    int8_bytes: int
    fp32_ms: float | None
    int8_ms: float | None
    speedup: float | None
    fp32_cpu_ms: float | None  # process CPU time per run (median): the figure to trust on a busy machine
    int8_cpu_ms: float | None
    deviation: float
    top1_agreement: float | None
    quality_fp32: float | None
    quality_int8: float | None
    max_deviation: float | None
    quantized_nodes: int
    kept_fp32: list[str]
    auto_fp32: dict[str, float]
    activations: str  # "uint8" (U8S8, ONNX Runtime's fast x86 path) or "int8" (S8S8)
    calibration_batches: int
    holdout_batches: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return asdict(self)

    def to_markdown(self) -> str:
        """A short table for the job report."""
        rows = [
            f"| int8 (ONNX Runtime QDQ, per-channel int8 weights, {self.activations} activations) | fp32 | int8 |",
            "|---|---|---|",
            f"| ONNX bytes | {self.fp32_bytes:,} | {self.int8_bytes:,} |",
        ]
        if self.fp32_ms is not None and self.int8_ms is not None:
            rows.append(f"| ORT latency (median, 1 thread) | {self.fp32_ms:.2f} ms | {self.int8_ms:.2f} ms |")
            rows.append(f"| ORT CPU time (median) | {self.fp32_cpu_ms:.2f} ms | {self.int8_cpu_ms:.2f} ms |")
        rows.append(f"| output deviation vs fp32 (held-out) | | {self.deviation:.3g} |")
        if self.top1_agreement is not None:
            rows.append(f"| top-1 agreement with fp32 | | {100 * self.top1_agreement:.1f} % |")
        if self.quality_int8 is not None:
            rows.append(f"| evaluate | {self.quality_fp32:.4g} | {self.quality_int8:.4g} |")
        rows.append(
            f"- quantized nodes: {self.quantized_nodes}; kept fp32 (asked): {self.kept_fp32 or 'none'}"
        )
        if self.auto_fp32:
            kept = ", ".join(f"`{k}` ({v:.3g})" for k, v in self.auto_fp32.items())
            rows.append(f"- kept fp32 to stay within deviation {self.max_deviation} (sensitivity): {kept}")
        rows += [f"- note: {n}" for n in self.notes]
        return "\n".join(rows) + "\n"


def split_holdout(batches: list[Any]) -> tuple[list[Any], list[Any], str | None]:
    """Every 4th batch held out (at least one); a single batch serves both, with a note."""
    if len(batches) == 1:
        return (
            batches,
            batches,
            "only one calibration batch: the int8 cost is measured on the calibration batch",
        )
    held = [b for i, b in enumerate(batches) if i % 4 == 3] or [batches[-1]]
    ids = {id(b) for b in held}
    return [b for b in batches if id(b) not in ids], held, None


def _match_keep(proto: onnx.ModelProto, names: Iterable[str]) -> list[str]:
    """ONNX node names for ``names`` (node names, or torch module paths found in a node's scope)."""
    found: list[str] = []
    for name in names:
        hits = [
            n.name
            for n in proto.graph.node
            if n.name == name or name in n.name.split("/") or n.name.endswith(f"/{name}")
        ]
        if not hits:
            weighty = [n.name for n in proto.graph.node if n.op_type in _WEIGHT_OPS][:12]
            raise IdapError(f"keep_fp32: no ONNX node matches {name!r}; weight layers are e.g. {weighty}")
        found += [h for h in hits if h not in found]
    return found


def _check_quantizable(proto: onnx.ModelProto, excluded: list[str]) -> None:
    from onnxruntime.quantization.registry import QDQRegistry

    inits = {i.name for i in proto.graph.initializer if len(i.dims) >= 2}
    bad = [
        f"{n.name or '?'} ({n.op_type})"
        for n in proto.graph.node
        if n.name not in excluded and n.op_type not in QDQRegistry and any(i in inits for i in n.input)
    ]
    if bad:
        raise IdapError(
            f"ONNX Runtime cannot quantize these weight layers to int8: {', '.join(bad[:8])}; name them in "
            "keep_fp32 to ship them in fp32, or export without quantize"
        )
    if not any(n.op_type in COMPUTE_OPS and n.name not in excluded for n in proto.graph.node):
        raise IdapError(
            "nothing to quantize: the model has no Conv / ConvTranspose / Gemm / MatMul outside keep_fp32"
        )


def quantize_onnx(
    fp32_path: str,
    path: str | os.PathLike[str],
    example_inputs: tuple[torch.Tensor, ...],
    calibration: list[Any],
    *,
    keep_fp32: Sequence[str] = (),
    max_deviation: float | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    latency: bool = True,
    activations: str = "uint8",
) -> QuantReport:
    """Quantize the verified fp32 ONNX file ``fp32_path`` into ``path`` (atomically) and measure the cost."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if activations not in ACTIVATIONS:
        raise IdapError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    calib, holdout, note = split_holdout(list(calibration))
    notes = [note] if note else []
    with tempfile.TemporaryDirectory(prefix="idap_fx_int8_") as tmp, atomic_output(path) as out:
        pre = os.path.join(tmp, "pre.onnx")
        try:
            quant_pre_process(fp32_path, pre, skip_symbolic_shape=True)
        except Exception as e:
            raise IdapError(
                f"ONNX Runtime's quantization pre-processing failed: {type(e).__name__}: {e}"
            ) from e
        proto = onnx.load(pre, load_external_data=False)
        keep = _match_keep(proto, keep_fp32)
        _check_quantizable(proto, keep)
        ref = run_outputs(pre, holdout)
        quantize_qdq(pre, out, calib, keep, activations)
        got = run_outputs(out, holdout)
        deviation, auto = output_deviation(ref, got), {}
        if max_deviation is not None and deviation > max_deviation:
            deviation, auto = protect(
                pre, out, calib, holdout, keep, ref, max_deviation, deviation, activations
            )
        top1 = output_agreement(ref, got if not auto else run_outputs(out, holdout))
        q32 = q8 = None
        if evaluate is not None:
            q32, q8 = float(evaluate(OrtModule(pre))), float(evaluate(OrtModule(out)))
        lat = None
        if latency:
            from idap_fx.deploy.latency import check_latency

            lat = check_latency(fp32_path, out, example_inputs, threads=1)
            if lat.optimized_cpu_ms >= lat.original_cpu_ms:
                notes.append(_not_faster(lat.original_cpu_ms, lat.optimized_cpu_ms))
        n_q = sum(n.op_type == "QuantizeLinear" for n in onnx.load(out, load_external_data=False).graph.node)
        report = QuantReport(
            path=os.path.abspath(os.fspath(path)),
            fp32_bytes=os.path.getsize(fp32_path),
            int8_bytes=os.path.getsize(out),
            fp32_ms=lat.original_median_ms if lat else None,
            int8_ms=lat.optimized_median_ms if lat else None,
            speedup=lat.speedup if lat else None,
            fp32_cpu_ms=lat.original_cpu_ms if lat else None,
            int8_cpu_ms=lat.optimized_cpu_ms if lat else None,
            deviation=deviation,
            top1_agreement=top1,
            quality_fp32=q32,
            quality_int8=q8,
            max_deviation=max_deviation,
            quantized_nodes=n_q,
            kept_fp32=keep,
            auto_fp32=auto,
            activations=activations,
            calibration_batches=len(calib),
            holdout_batches=len(holdout),
            notes=notes,
        )
    return report


def _not_faster(fp32_ms: float, int8_ms: float) -> str:
    """Say so when int8 does not pay in speed here: common on x86 CPUs without VNNI."""
    return (
        f"int8 ran no faster than fp32 on this CPU ({int8_ms:.2f} vs {fp32_ms:.2f} ms CPU time per run); the "
        "file is smaller, but ONNX Runtime's int8 kernels beat fp32 mainly on CPUs with int8 dot-product "
        "instructions (x86 VNNI, Arm dotprod): measure on the target"
    )


def export_int8(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: str | os.PathLike[str],
    *,
    calibration: Iterable[Any] | None = None,
    keep_fp32: Sequence[str] = (),
    max_deviation: float | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    latency: bool = True,
    activations: str = "uint8",
    **export_kwargs: Any,
) -> ExportReport:
    """Export fp32 (verified), quantize to int8 at ``path``; the report's ``quantization`` says what it cost."""
    batches = list(calibration) if calibration is not None else []
    if not batches:
        warnings.warn(
            "int8 calibration falls back to the example inputs (no calibration data given): activation "
            "ranges from one batch are rarely representative, and meaningless if it is random noise; "
            "pass calibration= (the data the pruning used)",
            stacklevel=3,
        )
        batches = [tuple(example_inputs)]
    export_kwargs.setdefault("dynamic_batch", True)
    with tempfile.TemporaryDirectory(prefix="idap_fx_fp32_") as tmp:
        fp32 = export_onnx(model, example_inputs, os.path.join(tmp, "fp32.onnx"), **export_kwargs)
        q = quantize_onnx(
            fp32.path,
            path,
            tuple(example_inputs),
            batches,
            keep_fp32=keep_fp32,
            max_deviation=max_deviation,
            evaluate=evaluate,
            latency=latency,
            activations=activations,
        )
    proto = onnx.load(q.path, load_external_data=False)
    return replace(fp32, path=q.path, onnx_bytes=q.int8_bytes, n_nodes=len(proto.graph.node), quantization=q)


def export_job_int8(
    res: Any, directory: str, opset: int | None, keep_fp32: Sequence[str], latency: bool
) -> ExportReport:
    """The int8 file of ``idap-fx optimize --int8``: the run's calibration data, and its deviation
    budget (when the budget is the label-free one) as the int8 step's own ``max_deviation``."""
    kind, limit = res.report.budget_kind, res.report.budget_limit
    return export_onnx(
        res.model,
        res.example_inputs,
        os.path.join(directory, "optimized.int8.onnx"),
        opset=opset,
        quantize="int8",
        calibration=res.calibration or None,
        keep_fp32=keep_fp32,
        max_deviation=limit if kind == "output_deviation" else None,
        latency=latency,
    )
