"""check_latency: structure and sanity of the report (never absolute timings: the machine is shared)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import random_plan
from torch import nn

import idap_fx
import idap_fx.deploy.latency as latency_mod
from idap_fx.deploy.latency import LatencyReport, check_latency
from idap_fx.deploy.onnx_export import export_onnx
from idap_fx.errors import IdapError


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


@pytest.fixture(scope="module")
def models() -> tuple[torch.fx.GraphModule, torch.fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    gm = idap_fx.trace(SmallNet().eval(), x)
    dg = idap_fx.analyze(gm)
    return gm, idap_fx.prune(gm, random_plan(dg, 0.5), dg), x


def _sane(rep: LatencyReport, runs: int) -> None:
    assert rep.runs >= runs
    for median, p90, cpu in (
        (rep.original_median_ms, rep.original_p90_ms, rep.original_cpu_ms),
        (rep.optimized_median_ms, rep.optimized_p90_ms, rep.optimized_cpu_ms),
    ):
        assert 0 < median <= p90 and cpu > 0
    assert rep.speedup == pytest.approx(rep.original_median_ms / rep.optimized_median_ms)
    assert rep.cpu_speedup == pytest.approx(rep.original_cpu_ms / rep.optimized_cpu_ms)


def test_modules(models) -> None:
    original, optimized, x = models
    rep = check_latency(original, optimized, x, warmup=2, repeats=8)
    _sane(rep, 8)
    assert rep.threads == 1
    # MACs counted on the modules: half of each conv's channels went, so well over 1.5x fewer.
    assert rep.macs_ratio is not None and rep.macs_ratio > 1.5
    assert rep.speedup_per_macs_ratio == pytest.approx(rep.speedup / rep.macs_ratio)
    assert rep.cpu_speedup_per_macs_ratio == pytest.approx(rep.cpu_speedup / rep.macs_ratio)
    d = rep.to_dict()
    assert d["threads"] == 1 and d["runs"] == rep.runs and set(d) >= {"speedup", "cpu_speedup", "contended"}
    text = str(rep)
    assert "1 thread(s)" in text and "speed-up" in text and "of what MACs predict" in text


def test_onnx_paths_and_given_macs(models, tmp_path) -> None:
    original, optimized, x = models
    export_onnx(original, x, tmp_path / "a.onnx", dynamic_batch=False)
    export_onnx(optimized, x, tmp_path / "b.onnx", dynamic_batch=False)
    rep = check_latency(
        str(tmp_path / "a.onnx"), tmp_path / "b.onnx", x, warmup=1, repeats=4, macs=(4e6, 1e6)
    )
    _sane(rep, 4)
    assert rep.macs_ratio == 4.0
    without = check_latency(tmp_path / "a.onnx", tmp_path / "b.onnx", x, warmup=0, repeats=2)
    assert without.macs_ratio is None and without.speedup_per_macs_ratio is None
    assert "MACs" not in str(without)


def test_same_model_against_itself(models, tmp_path) -> None:
    """Sanity, loosely: identical files cost the same CPU time (wall clock may not on a busy machine)."""
    original, _, x = models
    export_onnx(original, x, tmp_path / "a.onnx", dynamic_batch=False)
    rep = check_latency(tmp_path / "a.onnx", tmp_path / "a.onnx", x, warmup=3, repeats=30)
    assert 0.5 < rep.cpu_speedup < 2.0


def test_interleaved_in_alternating_order(models, monkeypatch) -> None:
    original, optimized, x = models
    calls: list[int] = []
    real_session = latency_mod._session

    class Recording:
        def __init__(self, session, tag: int) -> None:
            self.session, self.tag = session, tag

        def run(self, *args):
            calls.append(self.tag)
            return self.session.run(*args)

        def get_inputs(self):
            return self.session.get_inputs()

    made: list[int] = []

    def session(path: str, threads: int):
        made.append(len(made))
        return Recording(real_session(path, threads), made[-1])

    monkeypatch.setattr(latency_mod, "_session", session)
    rep = check_latency(original, optimized, x, warmup=2, repeats=4)
    assert rep.runs == 4
    assert calls == [0, 0, 1, 1] + [0, 1, 1, 0, 0, 1, 1, 0]


def test_threads_and_min_seconds(models) -> None:
    original, optimized, x = models
    rep = check_latency(original, optimized, x, threads=2, warmup=0, repeats=1, min_seconds=0.2)
    assert rep.threads == 2 and rep.runs > 1
    assert rep.contended is False  # only judged with one thread


def test_bad_arguments(models, tmp_path) -> None:
    original, optimized, x = models
    with pytest.raises(IdapError, match="threads"):
        check_latency(original, optimized, x, threads=0)
    with pytest.raises(IdapError, match="macs"):
        check_latency(original, optimized, x, macs=(1.0, 0.0))
    with pytest.raises(IdapError, match="does not exist"):
        check_latency(tmp_path / "missing.onnx", optimized, x)
    with pytest.raises(IdapError, match="example inputs"):
        check_latency(original, optimized, (x, x), repeats=1)

    class TwoInputs(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a * b

    export_onnx(TwoInputs(), (x, x), tmp_path / "two.onnx", dynamic_batch=False)
    with pytest.raises(IdapError, match="takes 2 inputs but 1 example inputs"):
        check_latency(tmp_path / "two.onnx", tmp_path / "two.onnx", x, repeats=1)


def test_reports_are_finite(models) -> None:
    original, optimized, x = models
    rep = check_latency(original, optimized, x, warmup=1, repeats=3)
    assert all(math.isfinite(v) for v in rep.to_dict().values() if isinstance(v, float))
