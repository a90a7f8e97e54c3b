"""Running and measuring int8 ONNX models, and choosing which layers stay fp32 (``quantize.py``'s engine).

``quantize_static`` (QDQ, per-channel int8 weights, uint8 or int8 activations, MinMax) with nodes excluded; the relative output
deviation and top-1 agreement of two models on the same batches; per-layer sensitivity;
and ``protect``: the fewest weight layers kept fp32 so the deviation fits a budget.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from idap_fx.errors import BudgetError, IdapError
from idap_fx.method.channel_stats import batch_args

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class OrtModule(nn.Module):
    """An ONNX file as a torch-callable module (for ``evaluate`` callbacks and comparisons)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def forward(self, *inputs: torch.Tensor) -> Any:
        from idap_fx.deploy.onnx_export import onnx_feed

        outs = [torch.from_numpy(o) for o in self.session.run(None, onnx_feed(self.session, inputs))]
        return outs[0] if len(outs) == 1 else tuple(outs)


class _Reader:
    """``CalibrationDataReader`` over tensor batches."""

    def __init__(self, path: str, batches: Sequence[Any]) -> None:
        from idap_fx.deploy.onnx_export import onnx_feed

        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self._feeds = iter([onnx_feed(session, tuple(batch_args(b))) for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def run_outputs(path: str, batches: Sequence[Any]) -> list[list[np.ndarray]]:
    """The model's outputs per batch."""
    from idap_fx.deploy.onnx_export import onnx_feed

    session = OrtModule(path).session
    return [session.run(None, onnx_feed(session, tuple(batch_args(b)))) for b in batches]


def _tensors(path: str, batches: Sequence[Any], names: Sequence[str]) -> dict[str, list[np.ndarray]]:
    """The values of (intermediate) tensors ``names`` per batch, read by making them graph outputs."""
    from idap_fx.deploy.onnx_export import onnx_feed

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


def output_deviation(ref: list[list[np.ndarray]], got: list[list[np.ndarray]], k: int | None = None) -> float:
    """Σ‖ref − got‖² / Σ‖ref‖² over every batch's (first ``k``) outputs."""
    return _rel([o for b in ref for o in b[:k]], [o for b in got for o in b[:k]])


def output_agreement(ref: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> float | None:
    """Top-1 agreement of the first outputs (None unless they are (batch, classes) logits)."""
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
    # a layer's output as the next layer sees it: after its own Q/DQ pair in the int8 graph, and after the
    # activation the quantizer folded into that pair (a Relu / Clip missing from the int8 graph) in fp32
    outs = {
        c: (
            _folded_output(graphs[0], nodes[1], nodes[0][c].output[0]),
            _dequantized(graphs[1], nodes[1][c].output[0]),
        )
        for c in names
    }
    ins = {c: (nodes[0][c].input[0], nodes[1][c].input[0]) for c in names}
    wanted = [sorted({pair[k] for m in (outs, ins) for pair in m.values()}) for k in (0, 1)]
    values = [_tensors(p, holdout, w) for p, w in zip((pre, qdq), wanted, strict=True)]
    inputs = {i.name for i in graphs[0].input}

    def err(pair: tuple[str, str]) -> float:
        return _rel(values[0][pair[0]], values[1][pair[1]])

    return {c: err(outs[c]) - (0.0 if ins[c][0] in inputs else err(ins[c])) for c in names}


def _consumers(graph: onnx.GraphProto, tensor: str) -> list[onnx.NodeProto]:
    return [n for n in graph.node if tensor in n.input]


def _dequantized(graph: onnx.GraphProto, tensor: str) -> str:
    """``tensor`` after the QuantizeLinear -> DequantizeLinear pair that follows it, if one does."""
    q = [n for n in _consumers(graph, tensor) if n.op_type == "QuantizeLinear"]
    dq = [n for n in _consumers(graph, q[0].output[0]) if n.op_type == "DequantizeLinear"] if q else []
    return dq[0].output[0] if dq else tensor


def _folded_output(graph: onnx.GraphProto, int8_nodes: dict[str, Any], tensor: str) -> str:
    """``tensor`` after the activations (Relu / Clip) that the int8 graph folded away."""
    while True:
        nxt = _consumers(graph, tensor)
        if len(nxt) != 1 or nxt[0].op_type not in ("Relu", "Clip") or nxt[0].name in int8_nodes:
            return tensor
        tensor = nxt[0].output[0]


def quantize_qdq(
    pre: str, out: str, calibration: Sequence[Any], exclude: list[str], activations: str = "uint8"
) -> None:
    """QDQ-quantize ``pre`` into ``out``: per-channel symmetric int8 weights, ``activations`` uint8 or int8."""
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
                activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude,
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            )
        ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise IdapError(f"ONNX Runtime could not quantize the model: {type(e).__name__}: {e}") from e


def protect(
    pre: str,
    out: str,
    calib: list[Any],
    holdout: list[Any],
    keep: list[str],
    ref: list[list[np.ndarray]],
    max_deviation: float,
    base: float,
    activations: str = "uint8",
) -> tuple[float, dict[str, float]]:
    """Keep the most sensitive layers fp32 (1, 2, 4, ...) until the deviation (``base`` in full int8) fits
    ``max_deviation``."""
    nodes = [
        n.name
        for n in onnx.load(pre, load_external_data=False).graph.node
        if n.op_type in COMPUTE_OPS and n.name not in keep
    ]

    def deviation_with(fp32: list[str]) -> float:
        """The output deviation with ``fp32`` (and ``keep``) left unquantized; ``out`` holds that model."""
        quantize_qdq(pre, out, calib, [*keep, *fp32], activations)
        return output_deviation(ref, run_outputs(out, holdout))

    sens = _sensitivity(pre, out, holdout, nodes)
    found = _keep_ranked(deviation_with, max_deviation, sens)
    if found is None:  # local errors did not predict the output's: measure what keeping each layer fp32 saves
        found = _keep_ranked(deviation_with, max_deviation, {c: base - deviation_with([c]) for c in nodes})
    if found is None:
        raise BudgetError(
            f"int8 breaks max_deviation={max_deviation} even with {len(nodes) - 1} of {len(nodes)} weight "
            "layers kept fp32; raise max_deviation or ship fp32"
        )
    return found


def _keep_ranked(
    deviation_with: Callable[[list[str]], float], max_deviation: float, sens: dict[str, float]
) -> tuple[float, dict[str, float]] | None:
    """Keep the top 1, 2, 4, ... layers by ``sens`` fp32 (never all) until the budget holds; None if never."""
    ranked = sorted(sens, key=lambda k: -sens[k])
    count = 1
    while count < len(ranked):
        chosen = ranked[:count]
        deviation = deviation_with(chosen)
        if deviation <= max_deviation:
            return deviation, {k: sens[k] for k in chosen}
        count = min(2 * count, len(ranked) - 1) if count < len(ranked) - 1 else len(ranked)
    return None
