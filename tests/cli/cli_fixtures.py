"""A small user package (``my_pkg``), calibration images and a runner for the ``idap-fx`` tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

MODELS = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        # wide enough that a 10 % step survives rounding widths to multiples of 8; strided to stay cheap
        self.stem = nn.Sequential(nn.Conv2d(3, 128, 3, stride=8, padding=1), nn.BatchNorm2d(128), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(128, 256, 3, stride=2, padding=1), nn.BatchNorm2d(256), nn.ReLU())
        self.head = nn.Linear(256, 10)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def build():
    torch.manual_seed(1)
    return Net().eval()
"""

DATA = """
import torch


def batches():
    g = torch.Generator().manual_seed(2)
    return [torch.randn(4, 3, 32, 32, generator=g) for _ in range(4)]
"""


_BIN = os.path.join(os.path.dirname(sys.executable), "idap-fx")
SCRIPT = [_BIN] if os.path.exists(_BIN) else [sys.executable, "-m", "idap_fx.cli"]


def make_user_folder(root: Path, images: int = 8) -> Path:
    """``root`` holding ``my_pkg`` (models.build, data.batches) and ``images/`` (PNG files)."""
    from PIL import Image

    pkg = root / "my_pkg"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(MODELS)
    (pkg / "data.py").write_text(DATA)
    (root / "images").mkdir(exist_ok=True)
    rng = __import__("numpy").random.default_rng(0)
    for i in range(images):
        pixels = rng.integers(0, 255, (40, 48, 3), dtype="uint8")
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
    return root


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``idap-fx ARGS`` as a subprocess (stderr is a pipe, not a terminal), with a clean PYTHONPATH.

    The console script, not ``python -m`` (which would put the folder on ``sys.path`` itself).
    """
    full = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"} | (env or {})
    return subprocess.run([*SCRIPT, *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=600)


def shell(line: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """One shell line as a user types it, with the console script's folder first on PATH."""
    bindir = os.path.dirname(SCRIPT[0]) if len(SCRIPT) == 1 else os.path.dirname(sys.executable)
    full = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"} | (env or {})
    full["PATH"] = bindir + os.pathsep + full.get("PATH", "")
    return subprocess.run(
        ["bash", "-c", line], cwd=cwd, env=full, capture_output=True, text=True, timeout=900
    )
