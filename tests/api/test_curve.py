"""The curve from one run: replayed snapshots equal separate runs (same plans, same weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import idap_fx
from idap_fx.method.allocate import AUTO_CANDIDATES
from idap_fx.metrics import count_params


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(32, 48, 3, padding=1, stride=2), nn.BatchNorm2d(48), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.block(x)
        return self.head(self.mid(x))


def _setup() -> tuple[nn.Module, torch.Tensor, list[torch.Tensor], dict]:
    torch.manual_seed(0)
    model = Net().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    cal = [torch.randn(4, 3, 12, 12) for _ in range(6)]
    kw = {"calibration": cal, "budget": 10.0, "quiet": True, "passes": ["prune_channels", "skip_layers"]}
    return model, cal[0][:2], cal, kw


def _same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k], sb[k]), k
    assert a.code == b.code


def test_curve_point_equals_separate_run_stage1() -> None:
    model, x, cal, kw = _setup()
    kw["passes"] = ["prune_channels"]
    res = idap_fx.optimize(model, x, target_macs=0.3, keep_snapshots=True, **kw)
    _same(res.snapshots.model(res.original, len(res.snapshots.items)), res.model)
    # allocator="auto" (the default) kept one allocator for the run; its points follow that one
    assert res.snapshots.allocator in AUTO_CANDIDATES
    separate = idap_fx.optimize(model, x, target_macs=0.5, **kw, allocator=res.snapshots.allocator)
    _same(res.at(target_macs=0.5), separate.model)


def test_curve_of_a_fixed_allocator_equals_separate_run() -> None:
    model, x, cal, kw = _setup()
    kw |= {"passes": ["prune_channels"], "allocator": "group"}
    res = idap_fx.optimize(model, x, target_macs=0.3, keep_snapshots=True, **kw)
    _same(res.at(target_macs=0.5), idap_fx.optimize(model, x, target_macs=0.5, **kw).model)


@pytest.mark.slow
def test_curve_point_equals_separate_runs() -> None:
    model, x, cal, kw = _setup()
    res = idap_fx.optimize(model, x, target_macs=0.3, keep_snapshots=True, **kw)
    snaps = res.snapshots
    assert len(snaps.items) >= 3
    # the replayed last point is the run's own model, bit for bit
    _same(snaps.model(res.original, len(snaps.items)), res.model)
    for t in (0.7, 0.5, 0.3):
        separate = idap_fx.optimize(model, x, target_macs=t, **kw, allocator=snaps.allocator)
        _same(res.at(target_macs=t), separate.model)
    # the records hold plans, not models: least-squares compensation is re-run on replay
    assert all(
        s.refit == "least_squares" and not s.params for s in snaps.items if s.stage == "prune_channels"
    )


def test_mean_compensation_is_stored_as_biases() -> None:
    model, x, cal, kw = _setup()
    kw |= {"passes": ["prune_channels"], "allocator": "group", "compensation": "mean"}
    res = idap_fx.optimize(model, x, target_macs=0.5, keep_snapshots=True, **kw)
    snaps = res.snapshots
    _same(snaps.model(res.original, len(snaps.items)), res.model)
    weights = sum(p.numel() * p.element_size() for p in res.original.parameters())
    assert 0 < snaps.nbytes < 0.1 * weights, (snaps.nbytes, weights)
    assert all(v.dim() == 1 and s.refit is None for s in snaps.items for v in s.params.values())


@pytest.mark.slow
def test_replay_holds_one_model_at_a_time() -> None:
    import gc
    import weakref

    model, x, cal, kw = _setup()
    kw["passes"] = ["prune_channels"]
    res = idap_fx.optimize(model, x, target_macs=0.3, keep_snapshots=True, **kw)
    refs = []
    for m in res.snapshots.replay(res.original):
        refs.append(weakref.ref(m))
        del m
        gc.collect()
        alive = [r for r in refs[:-1] if r() is not None]
        assert not alive, f"{len(alive)} earlier models still alive during replay"
    assert count_params(res.model) < count_params(res.original)


def test_keep_snapshots_refuses_training_recovery() -> None:
    model, x, cal, kw = _setup()
    with pytest.raises(idap_fx.IdapError, match="keep_snapshots"):
        idap_fx.optimize(model, x, target_macs=0.5, keep_snapshots=True, fine_tune=lambda m, t: None, **kw)


@pytest.mark.slow
def test_curve_measures_latency_and_int8(tmp_path: Path) -> None:
    from idap_fx.curve import measure_curve, write_curve

    model, x, cal, kw = _setup()
    res = idap_fx.optimize(model, x, target_macs=0.5, keep_snapshots=True, **kw)
    points = measure_curve(res, latency=True, int8=True)
    assert len(points) == len(res.snapshots.items) + 1
    assert points[0].macs == res.report.macs_before and points[-1].macs == res.report.macs_after
    assert all(p.fp32_ms > 0 and p.int8_ms > 0 and p.int8_bytes < p.fp32_bytes for p in points)
    csv_path, png_path = write_curve(points, tmp_path, "output_deviation")
    assert Path(csv_path).read_text().count("\n") == len(points) + 1
    assert Path(png_path).read_bytes()[:4] == b"\x89PNG"
