"""The deployment engineer's path through ``idap-fx``: weights, model files, calibration, plans, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from cli_fixtures import make_user_folder, run_cli
from onnx import numpy_helper

from idap_fx.cli import main
from idap_fx.cli_inputs import UsageError, load_calibration, load_model

TINY = ["my_pkg.models:build", "--input-shape", "1,3,32,32"]


@pytest.fixture
def user(tmp_path: Path) -> Path:
    return make_user_folder(tmp_path)


def test_weights_checkpoint_are_what_gets_pruned(user: Path) -> None:
    """--weights with a {'state_dict': ...} checkpoint: every kept filter of the first conv is a saved one
    (times its BatchNorm scale, which the export folds in)."""
    torch.manual_seed(7)
    saved = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in _tiny().state_dict().items()}
    saved = {k: v.abs() + 0.5 if "running_var" in k else v for k, v in saved.items()}
    torch.save({"state_dict": saved, "epoch": 3}, user / "ckpt.pt")
    r = run_cli("optimize", *TINY, "--weights", "ckpt.pt", "--target-macs", "0.5", "--budget", "none",
                "--no-latency", "--round-to", "1", cwd=user)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "RANDOM" not in r.stderr  # real weights: no random-weights warning
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(user / "model.onnx")).graph.initializer}
    w0 = next(v for k, v in inits.items() if v.ndim == 4 and v.shape[1] == 3)
    scale = saved["stem.1.weight"] / torch.sqrt(saved["stem.1.running_var"] + 1e-5)  # export folds the BN
    rows = (saved["stem.0.weight"] * scale[:, None, None, None]).numpy().reshape(128, -1)
    assert w0.shape[0] < 128  # pruned
    for row in w0.reshape(w0.shape[0], -1):
        assert np.abs(rows - row).max(axis=1).min() < 1e-5


def _tiny() -> torch.nn.Module:
    import importlib.util

    from cli_fixtures import MODELS

    spec = importlib.util.spec_from_loader("tiny_models", loader=None)
    mod = importlib.util.module_from_spec(spec)
    exec(MODELS, mod.__dict__)
    return mod.build()


def test_bad_weights_file_exits_2(user: Path) -> None:
    torch.save({"nothing": torch.zeros(2)}, user / "other.pt")
    r = run_cli("inspect", *TINY, "--weights", "other.pt", cwd=user)
    assert r.returncode == 2 and "other.pt" in r.stderr and "unexpected" in r.stderr


def test_same_command_twice_gives_identical_onnx_and_logs_each_step(user: Path) -> None:
    cmd = ("optimize", "torchvision:squeezenet1_0", "--input-shape", "1,3,64,64", "--target-macs", "0.6",
           "--no-latency")  # fmt: skip
    first = run_cli(*cmd, "--out", "a.onnx", cwd=user)
    second = run_cli(*cmd, "--out", "b.onnx", cwd=user)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert (user / "a.onnx").read_bytes() == (user / "b.onnx").read_bytes()
    assert "RANDOM weights" in first.stderr and "SYNTHETIC" in first.stderr
    assert "prune step 1/20" in first.stderr and "exporting ONNX" in first.stderr
    md = (user / "report.md").read_text()
    assert "WARNING" in md and "width before → after" in md


def test_dry_run_writes_no_model_and_its_plan_is_the_real_run(user: Path) -> None:
    args = (*TINY, "--calibration", "my_pkg.data:batches", "--target-macs", "0.6", "--ignore", "stem")
    dry = run_cli("plan", *args, cwd=user)
    assert dry.returncode == 0, dry.stderr
    assert not list(user.glob("*.onnx")) and "width before → after" in dry.stdout
    real = run_cli("optimize", *args, "--no-latency", cwd=user)
    assert real.returncode == 0, real.stderr
    planned = json.loads((user / "plan.json").read_text())["layers"]
    done = json.loads((user / "report.json").read_text())["layers"]
    assert planned == done
    assert any(r["width_after"] < r["width_before"] for r in done)
    stem = next(r for r in done if r["module"] == "stem.0")
    assert stem["width_after"] == stem["width_before"] == 128  # --ignore stem keeps its width
    html = user / "plan.html"
    r = run_cli("viz", "--plan", "report.json", "--out", str(html), cwd=user)
    assert r.returncode == 0, r.stderr
    assert "width before → after" in html.read_text() and "<td>stem.0</td>" in html.read_text()


def test_best_effort_writes_the_best_model_with_its_own_exit_code(user: Path) -> None:
    args = (*TINY, "--target-macs", "0.05", "--budget", "0.00001", "--no-latency")
    r = run_cli("optimize", *args, cwd=user)
    assert r.returncode == 3 and "--best-effort" in r.stderr and not (user / "model.onnx").exists()
    r = run_cli("optimize", *args, "--best-effort", cwd=user)
    assert r.returncode == 6, r.stderr
    assert (user / "model.onnx").exists() and "target not reached" in r.stderr


@pytest.mark.parametrize(
    "bad",
    [
        ["--target-macs", "50"],
        ["--target-params", "0"],
        ["--budget", "-1"],
        ["--round-to", "0"],
        ["--importance", "nope"],
        ["--passes", "prune_channels,nope"],
        ["--input-shape", "1,x"],
    ],
)
def test_every_bad_value_exits_2_naming_the_option(
    bad: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["optimize", "torchvision:resnet18", *bad])
    assert exc.value.code == 2
    assert bad[0] in capsys.readouterr().err


def test_misspelled_model_gets_a_suggestion(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "torchvision:resnet181"]) == 2
    assert "did you mean torchvision:resnet18" in capsys.readouterr().err


def test_torchvision_weight_names_read_the_local_cache_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UsageError, match="hub/checkpoints/squeezenet1_0-b66bff10.pth"):
        load_model("torchvision:squeezenet1_0", "IMAGENET1K_V1")
    with pytest.raises(UsageError, match="IMAGENET1K_V1"):
        load_model("torchvision:squeezenet1_0", "IMAGENET9K")
    torch.manual_seed(3)
    sd = torchvision.models.squeezenet1_0().state_dict()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(sd, tmp_path / "hub" / "checkpoints" / "squeezenet1_0-b66bff10.pth")
    loaded = load_model("torchvision:squeezenet1_0", "IMAGENET1K_V1")
    assert not loaded.warnings
    assert all(torch.equal(v, sd[k]) for k, v in loaded.model.state_dict().items())


def test_offline_weight_name_exits_2_naming_the_cache(tmp_path: Path) -> None:
    r = run_cli("inspect", "torchvision:squeezenet1_0", "--weights", "IMAGENET1K_V1", cwd=tmp_path,
                env={"TORCH_HOME": str(tmp_path)})  # fmt: skip
    assert r.returncode == 2 and str(tmp_path / "hub" / "checkpoints") in r.stderr


def test_pt2_program_is_a_model_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = _tiny(), torch.randn(2, 3, 32, 32)
    torch.export.save(torch.export.export(model, (x,)), str(tmp_path / "tiny.pt2"))
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "tiny.pt2", "--target-macs", "0.5", "--budget", "none", "--quiet"]) == 0
    report = json.loads((tmp_path / "plan.json").read_text())
    assert report["macs_ratio"] <= 0.5 * 1.03 and not list(tmp_path.glob("*.onnx"))


def test_calibration_tensors_and_callables(user: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = torch.randn(10, 3, 32, 32)
    torch.save(data, user / "cal.pt")
    np.save(user / "cal.npy", data.numpy())
    for name in ("cal.pt", "cal.npy"):
        batches = load_calibration(str(user / name), (1, 3, 32, 32), batch=4)
        assert [b.shape[0] for b in batches] == [4, 4, 2] and torch.allclose(torch.cat(batches), data)
    monkeypatch.syspath_prepend(str(user))
    assert len(load_calibration("my_pkg.data:batches", (1, 3, 32, 32))) == 4
    with pytest.raises(UsageError, match="my_pkg.data:missing"):
        load_calibration("my_pkg.data:missing", (1, 3, 32, 32))


def test_ignored_layers_api_keeps_widths_and_suggests_names() -> None:
    import idap_fx
    from idap_fx.errors import IdapError

    model, x = _tiny(), torch.randn(4, 3, 32, 32)
    res = idap_fx.optimize(
        model, x, target_macs=0.6, budget=None, quiet=True, ignored_layers=[torch.nn.Linear]
    )
    widths = {r.module: (r.width_before, r.width_after) for r in res.plan}
    assert widths["head"] == (10, 10) and widths["body.0"] == (256, 256)  # the Linear's input group is whole
    assert widths["stem.0"][1] < 128 and 0 < res.plan[0].removed_share < 1
    assert any("ignored_layers" in n for n in res.report.notes)
    with pytest.raises(IdapError, match="did you mean"):
        idap_fx.optimize(model, x, target_macs=0.6, ignored_layers=["haed"])
    with pytest.raises(IdapError, match="ignored_layers"):  # checked with the options, before any work
        idap_fx.optimize(model, x, target_macs=0.6, ignored_layers=[3])


ODD = """
import torch


class Untraceable(torch.nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


def build():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), Untraceable(), torch.nn.Conv2d(8, 8, 3))
"""


def test_leaf_module_option_and_the_hint_that_names_it(user: Path) -> None:
    (user / "my_pkg" / "odd.py").write_text(ODD)
    r = run_cli("inspect", "my_pkg.odd:build", "--input-shape", "1,3,16,16", cwd=user)
    assert r.returncode == 5 and "--leaf-module Untraceable" in r.stderr
    r = run_cli("inspect", "my_pkg.odd:build", "--input-shape", "1,3,16,16", "--leaf-module", "Untraceable",
                cwd=user)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "units:" in r.stdout and "channels:" in r.stdout  # the legend


def test_compensation_flag_reaches_every_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = _tiny(), torch.randn(2, 3, 32, 32)
    torch.export.save(torch.export.export(model, (x,)), str(tmp_path / "tiny.pt2"))
    monkeypatch.chdir(tmp_path)
    for flag, note in (("mean", "(mean)"), ("least_squares", "(least_squares)"), ("none", None)):
        args = [
            "plan",
            "tiny.pt2",
            "--target-macs",
            "0.5",
            "--budget",
            "none",
            "--quiet",
            "--compensation",
            flag,
        ]
        assert main(args) == 0
        notes = [s["note"] for s in json.loads((tmp_path / "plan.json").read_text())["steps"]]
        assert notes and all((note in n) if note else "compensated" not in n for n in notes), notes
