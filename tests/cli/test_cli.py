"""The idap-fx command, run as a subprocess: exit codes, outputs, no partial files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx

SMALL = ["torchvision:resnet18", "--input-shape", "1,3,64,64"]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "idap_fx.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_optimize_writes_onnx_and_reports(tmp_path: Path) -> None:
    r = _run("optimize", *SMALL, "--target-macs", "0.6", "--budget", "none", "--out", "m.onnx", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    onnx.checker.check_model(str(tmp_path / "m.onnx"))
    report = json.loads((tmp_path / "report.json").read_text())
    assert abs(report["macs_ratio"] - 0.6) <= 0.03 * 0.6
    assert report["job"]["parity_rel_error"] <= 1e-4
    assert report["latency"]["speedup"] > 0
    assert "| MACs |" in (tmp_path / "report.md").read_text()
    assert "ORT latency" in r.stdout


def test_bad_model_name_exits_2(tmp_path: Path) -> None:
    r = _run("optimize", "torchvision:no_such_net", "--target-macs", "0.5", cwd=tmp_path)
    assert r.returncode == 2
    assert "no_such_net" in r.stderr
    assert not list(tmp_path.iterdir())


def test_bad_output_path_exits_2_before_any_work(tmp_path: Path) -> None:
    r = _run("optimize", *SMALL, "--target-macs", "0.5", "--out", "missing/dir/m.onnx", cwd=tmp_path)
    assert r.returncode == 2
    assert "missing" in r.stderr
    assert not list(tmp_path.iterdir())


def test_impossible_target_is_bad_input_exit_2(tmp_path: Path) -> None:
    r = _run("optimize", *SMALL, "--target-macs", "1.5", "--no-latency", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "--target-macs" in r.stderr and "(0, 1)" in r.stderr
    assert not list(tmp_path.iterdir())


def test_unreachable_target_exits_3_without_files(tmp_path: Path) -> None:
    args = ("--target-macs", "0.05", "--budget", "0.00001", "--no-latency")
    r = _run("optimize", *SMALL, *args, cwd=tmp_path)
    assert r.returncode == 3, r.stderr
    assert "target" in r.stderr
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob("report.*"))


def test_bad_calibration_file_exits_2(tmp_path: Path) -> None:
    (tmp_path / "cal.txt").write_text("nope")
    r = _run("optimize", *SMALL, "--target-macs", "0.5", "--calibration", "cal.txt", cwd=tmp_path)
    assert r.returncode == 2 and "cal.txt" in r.stderr


def test_inspect_lists_groups(tmp_path: Path) -> None:
    r = _run("inspect", *SMALL, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "prunable" in r.stdout and "layer1_0_conv1" in r.stdout
