"""Verified ONNX export: what the pruned model is shipped as, checked before it is trusted.

``export_onnx`` puts a copy of the model in eval mode, folds BatchNorm (for
GraphModules), exports it, runs ``onnx.checker`` and compares onnxruntime's
outputs with torch's on the example inputs (and, with a dynamic batch axis, on
those inputs doubled along the batch, which catches exporters that silently bake
the example batch size into the graph). Only a model that passes every check
reaches ``path`` (``idap_fx.deploy.files.atomic_output``), so an interrupted or failed
export leaves no file behind and never clobbers an existing one.

Exporter: the TorchScript-based exporter (``dynamo=False``) is the default
(``exporter="auto"``), except for graphs of ATen ops (GraphModules that come from
``torch.export``, ``idap_fx.capture.torch_export.from_exported``), which only the dynamo
exporter can export. On
torch 2.14.1 it exported ten pruned torchvision GraphModules 3-35x faster than
the torch.export-based one, with static-batch graphs as fast in onnxruntime, and
exported the plain vit_b_16 module correctly where the dynamo exporter baked the
example batch into a Reshape (measurements in docs/export.md).
``exporter="dynamo"`` selects the other one (leaner dynamic-batch graphs for
reshape-heavy models such as shufflenet).

Out of scope: models whose weights exceed 2 GB (the protobuf limit; they would
need ONNX external data) and non-tensor example inputs.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import fx
from torch.utils._pytree import tree_leaves

from idap_fx.deploy.files import atomic_output
from idap_fx.errors import ExportError, ParityError
from idap_fx.passes.fold_bn import FoldBatchNorm

__all__ = ["DEFAULT_EXPORTER", "ExportReport", "export_onnx", "onnx_feed"]

Exporter = Literal["auto", "torchscript", "dynamo"]
DEFAULT_EXPORTER: Exporter = "auto"
_MAX_WEIGHT_BYTES = 2 * 1024**3
_TINY = 1e-12


@dataclass(frozen=True)
class ExportReport:
    """What was written and how closely it matches torch."""

    path: str
    opset: int
    exporter: str
    max_rel_error: float
    max_abs_error: float
    onnx_bytes: int
    n_nodes: int
    seconds: float
    bn_folded: bool
    slim: str  # "applied", "disabled", "skipped: onnxslim not installed" or "failed: ..."
    quantization: Any = (
        None  # idap_fx.deploy.quantize.QuantReport for quantize="int8" (parity fields: the fp32 graph)
    )


def _as_inputs(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise ExportError("example_inputs must be a tensor or a non-empty sequence of tensors")
    return inputs


def _prepare(
    model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], fold_bn: bool
) -> tuple[torch.nn.Module, bool]:
    """An eval-mode copy of ``model`` and whether BatchNorm was folded (GraphModules only).

    Plain modules are exported as they are; both exporters fold Conv+BatchNorm in eval mode anyway.
    """
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if weight_bytes > _MAX_WEIGHT_BYTES:
        raise ExportError(
            f"model weights are {weight_bytes / 1e9:.1f} GB; exports over 2 GB are not supported"
        )
    prepared = copy.deepcopy(model).eval()
    if fold_bn and isinstance(prepared, fx.GraphModule):
        return FoldBatchNorm(inputs)(prepared)
    return prepared, False


def _run_torch(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    try:
        with torch.no_grad():
            leaves = tree_leaves(model(*inputs))
    except Exception as e:
        raise ExportError(f"the model fails on the example inputs: {type(e).__name__}: {e}") from e
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        raise ExportError("the model must return a tensor or a (nested) tuple/list/dict of tensors")
    return [t.detach().cpu().numpy() for t in leaves]


def _export(
    model: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    n_outputs: int,
    out_ndims: list[int],
    path: str,
    *,
    exporter: Literal["torchscript", "dynamo"],
    opset: int | None,
    dynamic_batch: bool,
) -> None:
    input_names = [f"input{i}" for i in range(len(inputs))]
    output_names = [f"output{i}" for i in range(n_outputs)]
    kwargs: dict = {}
    if exporter == "dynamo":
        kwargs = {"external_data": False, "verbose": False}
        if dynamic_batch:
            kwargs["dynamic_shapes"] = tuple(
                {0: torch.export.Dim.DYNAMIC} if x.dim() else None for x in inputs
            )
    elif dynamic_batch:
        batched = [n for n, x in zip(input_names, inputs, strict=True) if x.dim() > 0]
        batched += [n for n, nd in zip(output_names, out_ndims, strict=True) if nd > 0]
        kwargs["dynamic_axes"] = {n: {0: "batch"} for n in batched}
    try:
        with warnings.catch_warnings():  # the TorchScript exporter is deprecated: chosen knowingly
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                inputs,
                path,
                dynamo=exporter == "dynamo",
                opset_version=opset,
                input_names=input_names,
                output_names=output_names,
                **kwargs,
            )
    except Exception as e:
        raise ExportError(f"the {exporter} exporter failed: {type(e).__name__}: {e}") from e


def _has_aten_ops(model: torch.nn.Module) -> bool:
    """Whether a GraphModule (or one nested in it) calls ATen operator overloads, as torch.export graphs do."""
    return any(
        isinstance(n.target, torch._ops.OpOverload | torch._ops.OpOverloadPacket)
        for m in model.modules()
        if isinstance(m, fx.GraphModule)
        for n in m.graph.nodes
        if n.op == "call_function"
    )


def _slim(path: str, slim: bool) -> str:
    """Optionally simplify the ONNX file in place with onnxslim (an optional extra)."""
    if not slim:
        return "disabled"
    try:
        import onnxslim
    except ImportError:
        return "skipped: onnxslim not installed"
    try:
        onnx.save(onnxslim.slim(path), path)
    except Exception as e:  # an optional clean-up must not lose a valid export
        return f"failed: {type(e).__name__}: {e}"
    return "applied"


def _errors(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """(max |got - want|, that / max |want|), treating NaN==NaN and equal infinities as a match."""
    if got.shape != want.shape:
        return float("inf"), float("inf")
    got, want = got.astype(np.float64), want.astype(np.float64)
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    diff = np.where(same, 0.0, np.abs(got - want))
    finite = np.abs(want[np.isfinite(want)])
    scale = max(float(finite.max()) if finite.size else 0.0, _TINY)
    abs_err = float(np.nan_to_num(diff, nan=np.inf).max()) if diff.size else 0.0
    return abs_err, abs_err / scale


def onnx_feed(session: ort.InferenceSession, inputs: Sequence[torch.Tensor]) -> dict[str, np.ndarray]:
    """The feed dict for ``session``: by name for our exports, else positionally.

    ``export_onnx`` names the inputs ``input0``, ``input1``, ...; the exporter drops
    inputs the graph never reads, so the names say which example input each one is.
    """
    names = [i.name for i in session.get_inputs()]
    indices = [int(n[5:]) if n.startswith("input") and n[5:].isdigit() else -1 for n in names]
    if not all(0 <= i < len(inputs) for i in indices):
        if len(names) != len(inputs):
            raise ExportError(
                f"the ONNX model takes {len(names)} inputs but {len(inputs)} example inputs were given"
            )
        indices = list(range(len(inputs)))
    return {n: inputs[i].detach().cpu().numpy() for n, i in zip(names, indices, strict=True)}


def _parity(path: str, cases: list[tuple[tuple[torch.Tensor, ...], list[np.ndarray]]]) -> tuple[float, float]:
    """Worst (abs, rel) error of onnxruntime against torch over all (inputs, expected outputs) cases."""
    try:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"onnxruntime cannot load the exported model: {e}") from e
    worst_abs = worst_rel = 0.0
    for inputs, expected in cases:
        feed = onnx_feed(session, inputs)
        try:
            got = session.run(None, feed)
        except Exception as e:
            batch = inputs[0].shape[0] if inputs[0].dim() else "n/a"
            raise ParityError(f"onnxruntime failed at batch {batch}: {e}") from e
        for g, w in zip(got, expected, strict=True):
            a, r = _errors(np.asarray(g), w)
            worst_abs, worst_rel = max(worst_abs, a), max(worst_rel, r)
    return worst_abs, worst_rel


def _reference_cases(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], dynamic_batch: bool) -> list:
    """(inputs, torch outputs) pairs the export must reproduce: the example, and twice its batch if dynamic."""
    cases = [(inputs, _run_torch(model, inputs))]
    if dynamic_batch and all(x.dim() > 0 for x in inputs):
        doubled = tuple(torch.cat([x, x]) for x in inputs)
        try:
            cases.append((doubled, _run_torch(model, doubled)))
        except ExportError as e:
            raise ExportError(
                f"{e}; with dynamic_batch=True dim 0 of every input is the batch and the model is "
                "checked at twice the example batch: pass dynamic_batch=False if an input has no batch "
                "dim or the model fixes its batch size (a torch.export program without a dynamic batch Dim)"
            ) from e
    return cases


def _verify(tmp: str, path: str | os.PathLike[str], cases: list, rtol: float) -> tuple[float, float]:
    """onnx.checker, then ONNX Runtime against torch on every case: (max abs, max rel) error, else raise."""
    try:
        onnx.checker.check_model(tmp)
    except Exception as e:
        raise ExportError(f"onnx.checker rejected the export of {path}: {e}") from e
    max_abs, max_rel = _parity(tmp, cases)
    if not max_rel <= rtol:
        raise ParityError(
            f"onnxruntime output differs from torch for {path}: max relative error {max_rel:.3g} "
            f"> rtol {rtol:.3g} (max abs error {max_abs:.3g})"
        )
    return max_abs, max_rel


def export_onnx(
    gm: torch.nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    path: str | os.PathLike[str],
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    rtol: float = 1e-4,
    fold_bn: bool = True,
    slim: bool = True,
    exporter: Exporter = DEFAULT_EXPORTER,
    quantize: Literal["int8"] | None = None,
    **int8_options: Any,
) -> ExportReport:
    """Export ``gm`` to ONNX at ``path`` and prove that onnxruntime reproduces it.

    ``quantize="int8"``: the verified fp32 graph is quantized by ONNX Runtime (static QDQ,
    per-channel int8 weights, uint8 activations by default) and the accuracy cost measured
    instead of parity; ``int8_options`` go to ``idap_fx.deploy.quantize.export_int8``
    (``calibration``, ``keep_fp32``, ``max_deviation``, ``evaluate``, ``latency``, ``activations``).

    ``exporter="auto"`` uses the TorchScript-based exporter, or the dynamo one for
    graphs of ATen ops (from ``torch.export``) and where the TorchScript one fails;
    ``ExportReport.exporter`` says which ran.

    Raises ``ExportError`` (directory missing/read-only: before exporting; exporter,
    checker or onnxruntime failure) or ``ParityError`` (relative error above ``rtol``).
    On any failure no file is left at ``path`` and an existing file there is untouched.
    """
    if quantize is not None:
        if quantize != "int8":
            raise ExportError(f"quantize must be None or 'int8', got {quantize!r}")
        from idap_fx.deploy.quantize import export_int8

        kw = dict(
            opset=opset, dynamic_batch=dynamic_batch, rtol=rtol, fold_bn=fold_bn, slim=slim, exporter=exporter
        )
        return export_int8(gm, _as_inputs(example_inputs), path, **int8_options, **kw)
    if int8_options:
        raise ExportError(f"unexpected arguments {sorted(int8_options)} (they need quantize='int8')")
    start = time.perf_counter()
    if exporter not in ("auto", "torchscript", "dynamo"):
        raise ExportError(f"unknown exporter {exporter!r}; use 'auto', 'torchscript' or 'dynamo'")
    auto = exporter == "auto"
    if auto:
        exporter = "dynamo" if _has_aten_ops(gm) else "torchscript"
    inputs = _as_inputs(example_inputs)
    with atomic_output(path) as tmp:
        model, bn_folded = _prepare(gm, inputs, fold_bn)
        cases = _reference_cases(model, inputs, dynamic_batch)
        expected = cases[0][1]
        shape = (model, inputs, len(expected), [e.ndim for e in expected], tmp)
        try:
            _export(*shape, exporter=exporter, opset=opset, dynamic_batch=dynamic_batch)
        except ExportError:
            if not auto or exporter == "dynamo":
                raise
            exporter = "dynamo"  # ops the TorchScript exporter lacks (sdpa's enable_gqa): the other one
            _export(*shape, exporter=exporter, opset=opset, dynamic_batch=dynamic_batch)
        slim_status = _slim(tmp, slim)
        max_abs, max_rel = _verify(tmp, path, cases, rtol)
        proto = onnx.load(tmp, load_external_data=False)
        opset_used = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        n_nodes, onnx_bytes = len(proto.graph.node), os.path.getsize(tmp)
    return ExportReport(
        path=os.path.abspath(os.fspath(path)),
        opset=opset_used,
        exporter=exporter,
        max_rel_error=max_rel,
        max_abs_error=max_abs,
        onnx_bytes=onnx_bytes,
        n_nodes=n_nodes,
        seconds=time.perf_counter() - start,
        bn_folded=bn_folded,
        slim=slim_status,
    )
