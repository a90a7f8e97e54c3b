"""Static int8 ONNX (QDQ) in the same job as pruning, with what it costs measured, not assumed.

``export_int8`` exports the fp32 model with ``export_onnx`` (so the fp32 graph is verified
against torch first), runs ONNX Runtime's pre-processing (``quant_pre_process``: shape
inference + graph optimisation) and ``quantize_static`` in QDQ format with per-channel
weights, calibrated (MinMax) on the calibration batches. The fp32 parity check cannot hold
for int8, so the report gives the accuracy cost instead: the relative output deviation
Σ‖y_fp32 − y_int8‖² / Σ‖y_fp32‖² and top-1 agreement on *held-out* batches (every 4th
calibration batch, as the pruning budget uses), or the user's ``evaluate`` on both models;
plus file sizes and ONNX Runtime latency (1 thread, interleaved, median: ``check_latency``).

Layers: ``keep_fp32`` names ONNX nodes or torch module paths (``features.0.0`` matches
``/features/features.0/features.0.0/Conv``) left in fp32. With ``max_deviation`` the
deviation is a budget: when int8 breaks it, every quantized weight layer's sensitivity is
measured (the relative error of its output in the int8 model minus that of its input, on
the held-out batches) and the most sensitive layers stay fp32 (1, 2, 4, ... of them) until
the budget holds. Weight-bearing ops ONNX Runtime cannot quantize raise ``IdapError``
(name them in ``keep_fp32`` to ship them in fp32); nothing is written unless all succeeds.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from idap_fx.errors import BudgetError, IdapError
from idap_fx.files import atomic_output
from idap_fx.onnx_export import ExportReport, export_onnx
from idap_fx.stats import batch_args

__all__ = ["OrtModule", "QuantReport", "export_int8", "export_job_int8", "quantize_onnx", "split_holdout"]

_WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN", "Einsum", "Gather")
_COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


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
    calibration_batches: int
    holdout_batches: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return asdict(self)

    def to_markdown(self) -> str:
        """A short table for the job report."""
        rows = [
            "| int8 (ONNX Runtime QDQ, per-channel) | fp32 | int8 |",
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


class OrtModule(nn.Module):
    """An ONNX file as a torch-callable module (for ``evaluate`` callbacks and comparisons)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def forward(self, *inputs: torch.Tensor) -> Any:
        from idap_fx.onnx_export import onnx_feed

        outs = [torch.from_numpy(o) for o in self.session.run(None, onnx_feed(self.session, inputs))]
        return outs[0] if len(outs) == 1 else tuple(outs)


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


class _Reader:
    """``CalibrationDataReader`` over tensor batches."""

    def __init__(self, path: str, batches: Sequence[Any]) -> None:
        from idap_fx.onnx_export import onnx_feed

        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self._feeds = iter([onnx_feed(session, tuple(batch_args(b))) for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


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
    if not any(n.op_type in _COMPUTE_OPS and n.name not in excluded for n in proto.graph.node):
        raise IdapError(
            "nothing to quantize: the model has no Conv / ConvTranspose / Gemm / MatMul outside keep_fp32"
        )


def _outputs(path: str, batches: Sequence[Any]) -> list[list[np.ndarray]]:
    """The model's outputs per batch."""
    from idap_fx.onnx_export import onnx_feed

    session = OrtModule(path).session
    return [session.run(None, onnx_feed(session, tuple(batch_args(b)))) for b in batches]


def _tensors(path: str, batches: Sequence[Any], names: Sequence[str]) -> dict[str, list[np.ndarray]]:
    """The values of (intermediate) tensors ``names`` per batch, read by making them graph outputs."""
    from idap_fx.onnx_export import onnx_feed

    proto = onnx.load(path)
    have = {o.name for o in proto.graph.output}
    for n in names:
        if n not in have:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    runs = [session.run(list(names), onnx_feed(session, tuple(batch_args(b)))) for b in batches]
    return {n: [r[i] for r in runs] for i, n in enumerate(names)}


def _rel(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    num = sum(float(((r.astype(np.float64) - g) ** 2).sum()) for r, g in zip(ref, got, strict=True))
    den = sum(float((r.astype(np.float64) ** 2).sum()) for r in ref)
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def _deviation(ref: list[list[np.ndarray]], got: list[list[np.ndarray]], k: int | None = None) -> float:
    return _rel([o for b in ref for o in b[:k]], [o for b in got for o in b[:k]])


def _agreement(ref: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> float | None:
    if not all(b[0].ndim == 2 for b in ref):
        return None
    same = sum(int((r[0].argmax(1) == g[0].argmax(1)).sum()) for r, g in zip(ref, got, strict=True))
    return same / sum(r[0].shape[0] for r in ref)


def _sensitivity(pre: str, qdq: str, holdout: Sequence[Any], candidates: list[str]) -> dict[str, float]:
    """Per weight layer: relative error of its output in the int8 model minus that of its input.

    Layers are matched by node name (the quantizer keeps them; tensor names can change where
    it folds an activation into the Q/DQ pair).
    """
    graphs = [onnx.load(p, load_external_data=False).graph for p in (pre, qdq)]
    nodes = [{n.name: n for n in g.node} for g in graphs]
    names = [c for c in candidates if c in nodes[1]]
    values = [
        _tensors(p, holdout, sorted({t for c in names for t in (nd[c].input[0], nd[c].output[0])}))
        for p, nd in zip((pre, qdq), nodes, strict=True)
    ]
    inputs = {i.name for i in graphs[0].input}

    def err(c: str, slot: str) -> float:
        t = [getattr(nd[c], slot)[0] for nd in nodes]
        return _rel(values[0][t[0]], values[1][t[1]])

    return {c: err(c, "output") - (0.0 if nodes[0][c].input[0] in inputs else err(c, "input")) for c in names}


def _quantize(pre: str, out: str, calibration: Sequence[Any], exclude: list[str]) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(
                pre,
                out,
                _Reader(pre, calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude,
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            )
        ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise IdapError(f"ONNX Runtime could not quantize the model: {type(e).__name__}: {e}") from e


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
) -> QuantReport:
    """Quantize the verified fp32 ONNX file ``fp32_path`` into ``path`` (atomically) and measure the cost."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

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
        ref = _outputs(pre, holdout)
        _quantize(pre, out, calib, keep)
        got = _outputs(out, holdout)
        deviation, auto = _deviation(ref, got), {}
        if max_deviation is not None and deviation > max_deviation:
            deviation, auto = _protect(pre, out, calib, holdout, keep, ref, max_deviation)
        top1 = _agreement(ref, got if not auto else _outputs(out, holdout))
        q32 = q8 = None
        if evaluate is not None:
            q32, q8 = float(evaluate(OrtModule(pre))), float(evaluate(OrtModule(out)))
        lat = None
        if latency:
            from idap_fx.latency import check_latency

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


def _protect(
    pre: str,
    out: str,
    calib: list[Any],
    holdout: list[Any],
    keep: list[str],
    ref: list[list[np.ndarray]],
    max_deviation: float,
) -> tuple[float, dict[str, float]]:
    """Keep the most sensitive layers fp32 (1, 2, 4, ...) until the deviation fits ``max_deviation``."""
    nodes = [
        n.name
        for n in onnx.load(pre, load_external_data=False).graph.node
        if n.op_type in _COMPUTE_OPS and n.name not in keep
    ]
    sens = _sensitivity(pre, out, holdout, nodes)
    ranked = sorted(sens, key=lambda k: -sens[k])
    count = 1
    while True:
        chosen = ranked[:count]
        if len(chosen) == len(ranked):
            raise BudgetError(
                f"int8 breaks max_deviation={max_deviation} even with {len(ranked) - 1} of {len(ranked)} weight "
                "layers kept fp32; raise max_deviation or ship fp32"
            )
        _quantize(pre, out, calib, keep + chosen)
        deviation = _deviation(ref, _outputs(out, holdout))
        if deviation <= max_deviation:
            return deviation, {k: sens[k] for k in chosen}
        count *= 2
        count = min(count, len(ranked))


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
