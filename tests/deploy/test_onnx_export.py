"""export_onnx: pruned models of every family export, pass onnx.checker and match torch in ONNX Runtime.

Also: parity failures raise, and no failure (exporter crash, checker, parity, Ctrl-C,
bad directory) leaves a file behind or touches an existing one.
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from helpers import random_plan, rel_err
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

import idap_fx
from idap_fx.deploy.files import atomic_output
from idap_fx.deploy.onnx_export import export_onnx
from idap_fx.errors import ExportError, ParityError
from idap_fx.graph.modules import PrunedMultiheadAttention


def small_vit() -> nn.Module:
    """A 2-layer ViT at 32x32; its zero-initialised head is randomised so outputs are not all zero."""
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128
    )
    nn.init.normal_(model.heads.head.weight, std=0.1)
    return model


def _tv(name: str) -> Callable[[], nn.Module]:
    return lambda: getattr(torchvision.models, name)(weights=None)


FAMILIES: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "resnet18": (_tv("resnet18"), 64),
    "mobilenet_v2": (_tv("mobilenet_v2"), 64),
    "efficientnet_b0": (_tv("efficientnet_b0"), 64),
    "convnext_tiny": (_tv("convnext_tiny"), 64),
    "vit": (small_vit, 32),
    "densenet121": (_tv("densenet121"), 64),
    "shufflenet_v2_x0_5": (_tv("shufflenet_v2_x0_5"), 64),
    "regnet_x_400mf": (_tv("regnet_x_400mf"), 64),
}


def pruned(name: str, batch: int = 1) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    """The family member pruned by a random 30 % plan, and an example input."""
    build, size = FAMILIES[name]
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    gm = idap_fx.trace(build().eval(), x)
    dg = idap_fx.analyze(gm)
    plan = random_plan(dg, 0.3)
    assert plan, f"{name}: nothing prunable"
    return idap_fx.prune(gm, plan, dg).eval(), x


def _ort(path: str, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_pruned_family_exports_with_parity(name: str, tmp_path) -> None:
    gm, x = pruned(name)
    path = tmp_path / f"{name}.onnx"
    report = export_onnx(gm, x, path)
    assert report.max_rel_error <= 1e-4 and report.exporter == "torchscript"
    assert report.path == str(path) and report.onnx_bytes == path.stat().st_size
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    producer = {out: n.op_type for n in proto.graph.node for out in n.output}
    unfolded = [n.name for n in proto.graph.node if n.op_type == "BatchNormalization"]
    # Only pre-activation BatchNorms (DenseNet's, after a concat) may remain: none follows a Conv/Gemm.
    assert all(
        producer.get(n.input[0]) not in ("Conv", "Gemm", "MatMul")
        for n in proto.graph.node
        if n.op_type == "BatchNormalization"
    )
    assert not unfolded or name == "densenet121", unfolded
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    # Independent check at another batch size than the example's (the dynamic axis really works).
    x3 = torch.randn(3, *x.shape[1:])
    with torch.no_grad():
        want = gm(x3)
    assert want.abs().max() > 0, "a model with all-zero output would make parity vacuous"
    assert rel_err(torch.from_numpy(_ort(str(path), x3)), want) < 1e-4
    assert os.listdir(tmp_path) == [path.name], "temporary files left behind"


def test_vit_export_uses_pruned_attention(tmp_path) -> None:
    gm, x = pruned("vit")
    assert any(isinstance(m, PrunedMultiheadAttention) for m in gm.modules())
    export_onnx(gm, x, tmp_path / "vit.onnx")


def test_bn_folded_before_export(tmp_path) -> None:
    gm, x = pruned("resnet18")
    report = export_onnx(gm, x, tmp_path / "r.onnx")
    assert report.bn_folded
    assert export_onnx(gm, x, tmp_path / "r2.onnx", fold_bn=False).bn_folded is False
    assert any(isinstance(m, nn.BatchNorm2d) for m in gm.modules()), "the input model must be untouched"


def test_static_batch(tmp_path) -> None:
    gm, x = pruned("resnet18", batch=2)
    path = tmp_path / "static.onnx"
    export_onnx(gm, x, path, dynamic_batch=False, opset=17)
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 17


class CallCounter(nn.Module):
    """Python state baked into the export: torch's output changes on every call, ONNX's does not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.conv(x) * self.calls


def test_parity_failure_raises_and_writes_nothing(tmp_path) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(b"previous export")
    with pytest.raises(ParityError, match="relative error"):
        export_onnx(CallCounter(), torch.randn(1, 3, 8, 8), path, dynamic_batch=False)
    assert path.read_bytes() == b"previous export"
    assert os.listdir(tmp_path) == ["bad.onnx"]


def test_parity_tolerance_is_configurable(tmp_path) -> None:
    report = export_onnx(
        CallCounter(), torch.randn(1, 3, 8, 8), tmp_path / "m.onnx", dynamic_batch=False, rtol=1.0
    )
    assert 0.1 < report.max_rel_error <= 1.0


def _mid_export_failure(exc: BaseException) -> Callable[..., None]:
    """A stand-in for torch.onnx.export that writes half a file, then fails."""

    def export(model, args, f, **kwargs) -> None:
        with open(f, "wb") as fh:
            fh.write(b"\x08\x07half-written")
        raise exc

    return export


@pytest.mark.parametrize("exc", [RuntimeError("exporter crashed"), KeyboardInterrupt()])
@pytest.mark.parametrize("existing", [False, True])
def test_failure_mid_export_leaves_no_file(exc: BaseException, existing: bool, tmp_path, monkeypatch) -> None:
    gm, x = pruned("resnet18")
    path = tmp_path / "model.onnx"
    if existing:
        path.write_bytes(b"the good old model")
    monkeypatch.setattr(torch.onnx, "export", _mid_export_failure(exc))
    expected = ExportError if isinstance(exc, Exception) else KeyboardInterrupt
    with pytest.raises(expected):
        export_onnx(gm, x, path)
    assert os.listdir(tmp_path) == (["model.onnx"] if existing else [])
    if existing:
        assert path.read_bytes() == b"the good old model"


def test_checker_failure_leaves_no_file(tmp_path, monkeypatch) -> None:
    gm, x = pruned("resnet18")

    def reject(model) -> None:
        raise onnx.checker.ValidationError("bad graph")

    monkeypatch.setattr(onnx.checker, "check_model", reject)
    with pytest.raises(ExportError, match="onnx.checker"):
        export_onnx(gm, x, tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


def test_unwritable_directory_names_path(tmp_path, monkeypatch) -> None:
    """Simulated (the tests may run as root, who can write anywhere): creating the file is refused."""
    real_open = os.open

    def deny(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(ExportError, match="Permission denied") as info, atomic_output(tmp_path / "m.onnx"):
        pytest.fail("the block must not run")
    assert str(tmp_path / "m.onnx") in str(info.value)


def test_atomic_output_moves_only_on_success(tmp_path) -> None:
    path = tmp_path / "out.bin"
    with atomic_output(path) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and not path.exists()
        with open(tmp, "wb") as fh:
            fh.write(b"done")
    assert path.read_bytes() == b"done"
    with pytest.raises(ValueError), atomic_output(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(b"partial")
        raise ValueError("boom")
    assert path.read_bytes() == b"done" and os.listdir(tmp_path) == ["out.bin"]


def test_slim_optional(tmp_path, monkeypatch) -> None:
    gm, x = pruned("mobilenet_v2")
    assert export_onnx(gm, x, tmp_path / "a.onnx", slim=False).slim == "disabled"
    monkeypatch.setitem(sys.modules, "onnxslim", None)  # not installed
    assert export_onnx(gm, x, tmp_path / "b.onnx").slim.startswith("skipped")
    calls = []
    fake = types.SimpleNamespace(slim=lambda p: calls.append(p) or onnx.load(p))
    monkeypatch.setitem(sys.modules, "onnxslim", fake)
    assert export_onnx(gm, x, tmp_path / "c.onnx").slim == "applied" and calls

    def broken(p: str) -> None:
        raise RuntimeError("slim bug")

    monkeypatch.setitem(sys.modules, "onnxslim", types.SimpleNamespace(slim=broken))
    report = export_onnx(gm, x, tmp_path / "d.onnx")
    assert report.slim.startswith("failed: RuntimeError") and report.max_rel_error <= 1e-4


def test_multiple_inputs_and_outputs(tmp_path) -> None:
    class TwoInTwoOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(6, 4), nn.Linear(5, 4)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.a(x) + self.b(y), self.a(x).relu()

    x, y = torch.randn(2, 6), torch.randn(2, 5)
    gm = idap_fx.trace(TwoInTwoOut(), (x, y))
    path = tmp_path / "two.onnx"
    report = export_onnx(gm, (x, y), path)
    assert report.max_rel_error <= 1e-4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input0", "input1"]
    assert [o.name for o in session.get_outputs()] == ["output0", "output1"]


def test_unused_input_dropped_by_exporter(tmp_path) -> None:
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor, unused: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    x, u = torch.randn(2, 4), torch.randn(2, 5)
    report = export_onnx(idap_fx.trace(Unused(), (x, u)), (x, u), tmp_path / "u.onnx")
    assert report.max_rel_error <= 1e-4


def test_input_without_batch_dim_needs_static_batch(tmp_path) -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * scale

    x, scale = torch.randn(2, 4), torch.randn(3)
    gm = idap_fx.trace(Scaled(), (x, scale))
    with pytest.raises(ExportError, match="dynamic_batch=False"):
        export_onnx(gm, (x, scale), tmp_path / "s.onnx")
    assert export_onnx(gm, (x, scale), tmp_path / "s.onnx", dynamic_batch=False).max_rel_error <= 1e-4


def test_bad_arguments(tmp_path) -> None:
    gm, x = pruned("resnet18")
    with pytest.raises(ExportError, match="unknown exporter"):
        export_onnx(gm, x, tmp_path / "m.onnx", exporter="tflite")
    with pytest.raises(ExportError, match="example_inputs"):
        export_onnx(gm, [], tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


def test_torch_export_graph_uses_dynamo_exporter(tmp_path) -> None:
    """A pruned GraphModule from torch.export holds ATen ops, which only the dynamo exporter handles."""
    from idap_fx.capture.torch_export import from_exported

    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3), nn.Flatten(1)).eval()
    x = torch.randn(1, 3, 10, 10)
    gm = from_exported(torch.export.export(model, (x,)), (x,))
    dg = idap_fx.analyze(gm)
    small = idap_fx.prune(gm, random_plan(dg, 0.3), dg)
    report = export_onnx(small, x, tmp_path / "ep.onnx", dynamic_batch=False)
    assert report.exporter == "dynamo" and report.max_rel_error <= 1e-4
    # The program was exported for batch 1 and guards it: a dynamic batch cannot be promised.
    with pytest.raises(ExportError, match="fixes its batch size"):
        export_onnx(small, x, tmp_path / "dyn.onnx")
    assert os.listdir(tmp_path) == ["ep.onnx"]


def test_dynamo_exporter_selectable(tmp_path) -> None:
    gm, x = pruned("resnet18")
    report = export_onnx(gm, x, tmp_path / "d.onnx", exporter="dynamo")
    assert report.exporter == "dynamo" and report.max_rel_error <= 1e-4
