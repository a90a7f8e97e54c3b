"""optimize(): MAC targets, the budget and its rollback, recovery, and the caller's model left alone."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision
from helpers import state_hash
from torch import nn

import idap_fx
from idap_fx.errors import BudgetError, IdapError
from idap_fx.method.allocate import select_units
from idap_fx.method.budget import Budget
from idap_fx.method.compensation import compensate
from idap_fx.method.scoring import ScoringContext, get_importance
from idap_fx.metrics import count_macs


def _cal(shape: tuple[int, ...], n: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def _model(name: str, **kw: object) -> nn.Module:
    torch.manual_seed(0)
    m = torchvision.models.get_model(name, weights=None, **kw).eval()
    if name.startswith("vit"):
        nn.init.normal_(m.heads.head.weight, std=0.02)
    return m


CASES = [
    ("resnet18", {}, 64),
    ("mobilenet_v2", {}, 64),
    pytest.param("resnet50", {}, 64, marks=pytest.mark.slow),
    pytest.param("efficientnet_b0", {}, 64, marks=pytest.mark.slow),
    pytest.param("convnext_tiny", {}, 64, marks=pytest.mark.slow),
    pytest.param("vit_b_16", {"image_size": 64}, 64, marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("name", "kw", "size"), CASES)
def test_mac_target_is_reached_within_3_percent(name: str, kw: dict, size: int) -> None:
    model = _model(name, **kw)
    before = state_hash(model)
    x = torch.randn(2, 3, size, size)
    res = idap_fx.optimize(
        model, x, calibration=_cal((2, 3, size, size), 3), target_macs=0.5, budget=None, quiet=True
    )
    measured = count_macs(res.model, x) / count_macs(res.original, x)
    assert abs(measured - 0.5) <= 0.03 * 0.5, measured
    assert res.report.macs_ratio == pytest.approx(measured)
    assert res.report.target_reached
    assert state_hash(model) == before  # the caller's model is never mutated
    with torch.no_grad():
        assert res.model(x).shape == model(x).shape
    # the report is complete and honest
    rep = res.report
    assert rep.steps and all(s["accepted"] for s in rep.steps)
    assert rep.schedule[0] == pytest.approx(0.1)
    assert rep.macs_after == count_macs(res.model, x)
    assert {"trace", "analyze", "score", "rewrite"} <= set(rep.timings)
    assert "MACs" in rep.to_markdown() and '"macs_ratio"' in rep.to_json()


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 16, 3, padding=1),
        nn.GELU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()
    nn.init.zeros_(m[-1].bias)  # the output then depends on the features alone
    return m


def test_label_free_budget_holds_on_held_out_batches_and_breaking_steps_roll_back() -> None:
    model = _tiny()
    x = torch.randn(2, 3, 16, 16)
    cal = _cal((4, 3, 16, 16), 8)
    res = idap_fx.optimize(model, x, calibration=cal, budget=0.02, compensation=False, quiet=True)
    held = [b for i, b in enumerate(cal) if i % 4 == 3]
    check = Budget(res.original, 0.02, held)
    assert check.deviation(res.model) <= 0.02
    assert res.report.budget_consumed == pytest.approx(check.deviation(res.model))
    assert res.report.macs_after < res.report.macs_before  # it did prune: not silently the original
    rejected = [s for s in res.report.steps if not s["accepted"]]
    assert rejected and "rolled back" in rejected[-1]["note"]
    assert all(s["budget_consumed"] > 0.02 for s in rejected)
    assert "budget" in res.report.stop_reason


def test_bad_budget_and_missing_goal_are_refused() -> None:
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(BudgetError, match="budget"):
        idap_fx.optimize(_tiny(), x, budget=-0.1, quiet=True)
    with pytest.raises(IdapError, match="nothing to aim for"):
        idap_fx.optimize(_tiny(), x, budget=None, quiet=True)
    with pytest.raises(IdapError, match="calibration batch 1"):
        idap_fx.optimize(_tiny(), x, calibration=[x, torch.randn(1, 3, 9, 8)], target_macs=0.5, quiet=True)
    with pytest.raises(IdapError, match="empty"):
        idap_fx.optimize(_tiny(), x, calibration=[], target_macs=0.5, quiet=True)


def test_compensation_reduces_one_shot_error() -> None:
    model = _tiny()
    x = torch.randn(2, 3, 16, 16)
    gm = idap_fx.trace(model, x)
    dg = idap_fx.analyze(gm)
    cal = _cal((8, 3, 16, 16), 4)
    ctx = ScoringContext(gm, dg, cal)
    scores = get_importance("divergence")(ctx)
    plan = select_units(scores, dg.prunable, 20)
    plain = idap_fx.prune(gm, plan, dg)
    fixed = idap_fx.prune(gm, plan, dg)
    assert compensate(gm, fixed, dg, plan, ctx.sites) >= 2
    check = Budget(gm, None, _cal((8, 3, 16, 16), 2, seed=5))
    assert check.deviation(fixed) < 0.8 * check.deviation(plain)


def test_fine_tune_callback_and_distillation() -> None:
    model = _tiny()
    x = torch.randn(2, 3, 16, 16)
    cal = _cal((4, 3, 16, 16), 4)
    calls = []

    def fine_tune(m: nn.Module, teacher: nn.Module) -> None:
        calls.append((sum(p.numel() for p in m.parameters()), sum(p.numel() for p in teacher.parameters())))

    res = idap_fx.optimize(
        model, x, calibration=cal, target_macs=0.5, budget=None, fine_tune=fine_tune, quiet=True
    )
    assert calls and all(student < teacher for student, teacher in calls)
    assert res.report.target_reached

    def reshaping(m: nn.Module, teacher: nn.Module) -> None:
        m.get_submodule("0").weight = nn.Parameter(torch.zeros(1, 3, 3, 3))

    with pytest.raises(IdapError, match="changed"):
        idap_fx.optimize(
            model, x, calibration=cal, target_macs=0.5, budget=None, fine_tune=reshaping, quiet=True
        )

    data = torch.utils.data.TensorDataset(torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    res = idap_fx.optimize(
        model,
        x,
        calibration=cal,
        target_macs=0.5,
        budget=None,
        train_loader=loader,
        distill_steps=4,
        quiet=True,
    )
    assert res.report.target_reached
    assert all("distilled" in s["note"] for s in res.report.steps)
    with torch.no_grad():
        assert torch.isfinite(res.model(x)).all()


def test_result_exports_to_onnx_and_runs(tmp_path) -> None:
    model = _model("resnet18")
    x = torch.randn(1, 3, 64, 64)
    res = idap_fx.optimize(model, x, target_macs=0.6, budget=None, quiet=True)
    path = tmp_path / "m.onnx"
    res.export_onnx(path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        ref = res.model(x).numpy()
    assert out.shape == (1, 1000)
    assert abs(out - ref).max() <= 1e-4 * max(1.0, abs(ref).max())


def test_latency_target_stops_pruning_when_met() -> None:
    model = _tiny()
    x = torch.randn(1, 3, 16, 16)
    res = idap_fx.optimize(model, x, target_latency=1e6, budget=None, quiet=True)
    assert len(res.report.steps) == 1  # any model meets a 1000 s latency: stop after the first step
    assert "latency target reached" in res.report.stop_reason
    lat = res.check_latency(repeats=5, warmup=1)
    assert lat.threads == 1 and lat.original_median_ms > 0 and lat.optimized_median_ms > 0
    assert lat.macs_ratio == pytest.approx(res.report.macs_before / res.report.macs_after)


def test_group_ranking_compares_units_within_their_layer() -> None:
    from idap_fx.method.allocate import normalise_per_group

    scores = {
        "wide": np.array([1e-6, 2e-6, 3e-6]),
        "narrow": np.array([1.0, 2.0, 3.0]),
        "bn": np.array([np.inf]),
    }
    norm = normalise_per_group(scores)
    np.testing.assert_allclose(norm["wide"], norm["narrow"])  # scale of a layer no longer decides
    assert np.isinf(norm["bn"]).all()
    with pytest.raises(IdapError, match="allocator"):
        idap_fx.optimize(_tiny(), torch.randn(1, 3, 8, 8), target_macs=0.5, allocator="per-layer", quiet=True)


def test_stage_two_alone_needs_no_target_or_budget() -> None:
    res = idap_fx.optimize(
        _tiny(), torch.randn(2, 3, 8, 8), passes=("skip_layers",), budget=None, max_skips=1, quiet=True
    )
    assert len(res.report.removed_layers) <= 1
    assert "SkipLayers" in res.report.stop_reason


def test_optimize_reads_the_callers_weights_without_copying_or_touching_them() -> None:
    """``optimize`` traces with the caller's parameter tensors (one copy of the weights fewer): Taylor
    scoring's backward must leave their ``.grad`` as it was, and a result that rewrote nothing must not
    alias them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))  # fmt: skip
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)  # a caller mid-training
    before = state_hash(model)
    batches = [torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(4)]

    def loss_fn(m: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return m(*batch).pow(2).mean()  # a batch is the tuple of model inputs

    res = idap_fx.optimize(model, batches[0], calibration=batches, target_macs=0.6, budget=None,
                           importance="taylor", loss_fn=loss_fn, quiet=True)  # fmt: skip
    assert state_hash(model) == before
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    theirs = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in theirs for p in res.model.parameters())
    same = idap_fx.optimize(model, batches[0], calibration=batches, target_macs=0.5, budget=None, quiet=True,
                            ignored_layers=[nn.Conv2d, nn.Linear], strict=False)  # fmt: skip
    assert same.report.macs_ratio == 1.0  # nothing rewritten
    assert not any(p.data_ptr() in theirs for p in same.model.parameters())
    assert torch.equal(same.model(batches[0]), model(batches[0]))
