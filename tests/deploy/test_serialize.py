"""save/load: pruned GraphModules round-trip through a weights_only-safe file, without the user's code."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
import torchvision
from helpers import random_plan, rel_err, state_hash
from torch import fx, nn
from torchvision.models.vision_transformer import VisionTransformer

import idap_fx
from idap_fx.deploy.serialize import FORMAT, load, save
from idap_fx.errors import ExportError
from idap_fx.graph.modules import PrunedMultiheadAttention


def small_vit() -> nn.Module:
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128
    )
    nn.init.normal_(model.heads.head.weight, std=0.1)
    return model


MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(weights=None), 64),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(weights=None), 64),
    "vit": (small_vit, 32),
}


def pruned(name: str) -> tuple[fx.GraphModule, torch.Tensor, dict[str, list[int]]]:
    build, size = MODELS[name]
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    gm = idap_fx.trace(build().eval(), x)
    dg = idap_fx.analyze(gm)
    plan = random_plan(dg, 0.3)
    return idap_fx.prune(gm, plan, dg).eval(), x, plan


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip(name: str, tmp_path) -> None:
    gm, x, plan = pruned(name)
    path = tmp_path / f"{name}.pt"
    save(SimpleNamespace(model=gm, plan=plan, report={"macs_ratio": 0.5}), path)
    raw = torch.load(path, weights_only=True)  # the file itself is plain weights_only data
    assert raw["format"] == FORMAT
    loaded = load(path)
    assert state_hash(loaded) == state_hash(gm)
    with torch.no_grad():
        assert rel_err(loaded(x), gm(x)) == 0.0
    assert loaded.code == gm.code
    assert loaded.meta["idap_fx"] == {"plan": plan, "report": {"macs_ratio": 0.5}}
    if name == "vit":
        assert any(isinstance(m, PrunedMultiheadAttention) for m in loaded.modules())
    assert os.listdir(tmp_path) == [path.name]


def test_training_flags_and_frozen_parameters_kept(tmp_path) -> None:
    gm, _, _ = pruned("resnet18")
    gm.train()
    gm.bn1.eval()
    gm.conv1.weight.requires_grad_(False)
    save(gm, tmp_path / "m.pt")
    loaded = load(tmp_path / "m.pt")
    assert loaded.training and not loaded.bn1.training and loaded.layer1.training
    assert not loaded.conv1.weight.requires_grad and loaded.fc.weight.requires_grad


class UserNet(nn.Module):
    """A user class that will not exist in the process that loads the file."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.branch = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = y + self.branch(y)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def test_loads_without_original_class_in_fresh_process(tmp_path) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    gm = idap_fx.trace(UserNet().eval(), x)
    dg = idap_fx.analyze(gm)
    small = idap_fx.prune(gm, random_plan(dg, 0.3), dg).eval()
    save(small, tmp_path / "user.pt")
    with torch.no_grad():
        torch.save({"x": x, "y": small(x)}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from idap_fx.deploy.serialize import load
        gm = load({str(tmp_path / "user.pt")!r})
        io = torch.load({str(tmp_path / "io.pt")!r}, weights_only=True)
        assert "test_serialize" not in sys.modules and "UserNet" not in repr(type(gm))
        with torch.no_grad():
            print(float((gm.eval()(io["x"]) - io["y"]).abs().max()))
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) == 0.0


def _tamper(path, edit) -> None:
    payload = torch.load(path, weights_only=True)
    edit(payload)
    torch.save(payload, path)


def _first(nodes: list[dict], op: str) -> dict:
    return next(n for n in nodes if n["op"] == op)


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda p: _first(p["graphs"][""], "call_function").update(target="os.system"), "os.system"),
        (lambda p: _first(p["graphs"][""], "call_function").update(target="builtins.eval"), "builtins.eval"),
        (
            lambda p: _first(p["graphs"][""], "call_function").update(target="operator.methodcaller"),
            "methodcaller",
        ),
        (lambda p: _first(p["graphs"][""], "call_function").update(target="torch.from_file"), "from_file"),
        (
            lambda p: _first(p["graphs"][""], "call_function").update(target="torchvision.models.get_model"),
            "get_model",
        ),
        (lambda p: _first(p["graphs"][""], "call_method").update(target="apply_"), "apply_"),
        (lambda p: _first(p["graphs"][""], "call_method").update(target="__reduce__"), "__reduce__"),
        (lambda p: p["modules"]["conv"].update({"class": "subprocess.Popen"}), "subprocess.Popen"),
        (lambda p: _first(p["graphs"][""], "call_module").update(op="exec"), "exec"),
    ],
)
def test_tampered_file_refused(edit, named: str, tmp_path) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.conv(x)).flatten(1)

    path = tmp_path / "m.pt"
    save(idap_fx.trace(Net(), torch.randn(1, 3, 8, 8)), path)
    _tamper(path, edit)
    with pytest.raises(ExportError, match=named.replace(".", r"\.")):
        load(path)


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_not_executed(tmp_path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"format": FORMAT, "graphs": _Exploit(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(ExportError, match="weights_only"):
        load(tmp_path / "evil.pt")
    assert not marker.exists()


def test_not_an_idap_file(tmp_path) -> None:
    torch.save({"weight": torch.ones(2)}, tmp_path / "sd.pt")
    with pytest.raises(ExportError, match="format"):
        load(tmp_path / "sd.pt")
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.pt")


def _private_helper(x: torch.Tensor) -> torch.Tensor:
    return x * 2


fx.wrap("_private_helper")


def test_save_refuses_unlisted_function_and_writes_nothing(tmp_path) -> None:
    class UsesHelper(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return _private_helper(x) + 1

    gm = fx.symbolic_trace(UsesHelper())
    with pytest.raises(ExportError, match="_private_helper"):
        save(gm, tmp_path / "m.pt")
    assert os.listdir(tmp_path) == []


def test_save_refuses_torch_export_graph(tmp_path) -> None:
    from idap_fx.capture.torch_export import from_exported

    x = torch.randn(1, 4)
    gm = from_exported(torch.export.export(nn.Linear(4, 2), (x,)), (x,))
    with pytest.raises(ExportError, match="codegen"):
        save(gm, tmp_path / "m.pt")
    assert os.listdir(tmp_path) == []


def test_save_needs_graph_module(tmp_path) -> None:
    with pytest.raises(ExportError, match="GraphModule"):
        save(nn.Linear(2, 2), tmp_path / "m.pt")
    with pytest.raises(ExportError, match="does not exist"):
        save(fx.symbolic_trace(nn.Linear(2, 2)), tmp_path / "nope" / "m.pt")


def test_an_optimize_result_saves_with_its_plan_and_report(tmp_path) -> None:
    """``save(result)``: the plan is a list of ``LayerChange`` dataclasses, which the JSON step refused
    ("Object of type LayerChange is not JSON serializable") for every result ``optimize`` returns."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    res = idap_fx.optimize(
        torchvision.models.resnet18(weights=None).eval(), x, target_macs=0.8, budget=None, quiet=True
    )
    path = tmp_path / "r18.idap"
    save(res, path)
    loaded = load(path)
    with torch.no_grad():
        assert rel_err(loaded(x), res.model(x)) == 0.0
    saved = loaded.meta["idap_fx"]
    assert [c["module"] for c in saved["plan"]] == [c.module for c in res.plan]
    assert saved["report"]["macs_ratio"] == pytest.approx(res.report.macs_ratio)
