"""Retraining-free compensation: the pruned model against the unpruned one on held-out inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import idap_fx
from idap_fx.method import compensation
from idap_fx.method.collective import Reducer, use_reducer
from idap_fx.method.compensation import compensate
from idap_fx.method.scoring import ScoringContext


class Redundant(nn.Module):
    """A hidden layer of 8 channels spanning 3 dimensions: any 4 of them carry all the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 5, 3)  # no padding: every position sees real inputs
        self.fc = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b(self.a(x)).mean(dim=(2, 3)))


def _batches(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 10, 10, generator=g) for _ in range(n)]


def _rel_error(reference: nn.Module, model: nn.Module, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        ref = torch.cat([reference(x) for x in batches])
        out = torch.cat([model(x) for x in batches])
    return float((out - ref).norm() / ref.norm())


def _pruned(mode: str | None, batches: list[torch.Tensor]) -> tuple[nn.Module, nn.Module, int]:
    torch.manual_seed(0)
    model = Redundant().eval()
    gm = idap_fx.trace(model, batches[0])
    dg = idap_fx.analyze(gm)
    (group,) = [g for g in dg.prunable if any(m.param == "a.weight" for m in g.members)]
    plan = {group.id: [0, 2, 5, 7]}
    after = idap_fx.prune(gm, plan, dg)
    changed = 0
    if mode is not None:
        ctx = ScoringContext(gm, dg, batches)
        changed = compensate(gm, after, dg, plan, ctx.sites, mode, batches)
    return gm, after, changed


def test_least_squares_recovers_what_the_kept_channels_span() -> None:
    cal, held_out = _batches(4, 0), _batches(2, 9)
    errors = {}
    for mode in (None, "mean", "least_squares"):
        gm, after, changed = _pruned(mode, cal)
        assert changed == (0 if mode is None else 1)
        errors[mode] = _rel_error(gm, after, held_out)
    assert errors["mean"] < errors[None]
    # the removed channels are exact linear functions of the kept ones: only the ridge is left
    assert errors["least_squares"] < 0.05 * errors["mean"]
    assert errors["least_squares"] < 0.02


def test_least_squares_without_ridge_is_exact_and_chunks_change_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cal, held_out = _batches(4, 0), _batches(2, 9)
    monkeypatch.setattr(compensation, "RIDGE", 0.0)
    gm, after, _ = _pruned("least_squares", cal)
    assert _rel_error(gm, after, held_out) < 1e-4
    monkeypatch.setattr(compensation, "_GRAM_BUDGET", 1)  # one consumer per pass
    _, again, _ = _pruned("least_squares", cal)
    for k, v in after.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v)


class _Halves(Reducer):
    """Each 'rank' saw half the batches: the other half's sums arrive by all-reduce."""

    def __init__(self, other: list[list[torch.Tensor]]) -> None:
        self.other = other

    def all_sum_(self, tensors):  # noqa: ANN001, ANN201 - the Reducer signature
        for t, o in zip(tensors, self.other.pop(0), strict=True):
            t += o


def test_moments_are_summed_over_processes() -> None:
    cal = _batches(4, 0)
    gm, _, _ = _pruned(None, cal)
    dg = idap_fx.analyze(gm)
    (group,) = [g for g in dg.prunable if any(m.param == "a.weight" for m in g.members)]
    ctx = ScoringContext(gm, dg, cal)
    found = compensation.consumers(gm, dg, {group.id: [0, 2, 5, 7]}, ctx.sites)
    whole = compensation._moments(gm, found, cal)
    second = compensation._moments(gm, found, cal[2:])
    with use_reducer(_Halves([list(m) for m in second])):
        first = compensation._moments(gm, found, cal[:2])
    for a, b in zip(whole, first, strict=True):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y)


def test_optimize_accepts_each_mode_and_least_squares_is_closer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()  # fmt: skip
    cal, held_out = _batches(4, 0), _batches(2, 9)
    errors = {}
    for mode in ("mean", "least_squares", False):
        res = idap_fx.optimize(model, cal[0], calibration=cal, target_macs=0.5, budget=None, quiet=True,
                               round_to=1, allocator="group", compensation=mode)  # fmt: skip
        errors[mode] = _rel_error(model, res.model, held_out)
        notes = " ".join(s["note"] for s in res.report.steps)
        assert (f"({mode})" in notes) == (mode is not False)
    assert errors["least_squares"] < errors["mean"] < errors[False]


class _Deep(nn.Module):
    """Three layers after the pruned one: each sees inputs the pruning changed."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b(torch.relu(self.a(x))))
        return self.fc(torch.relu(self.c(h)).mean(dim=(2, 3)))


def _deep(mode: str, batches: list[torch.Tensor], plan_units: list[int]) -> tuple[nn.Module, nn.Module, int]:
    torch.manual_seed(0)
    gm = idap_fx.trace(_Deep().eval(), batches[0])
    dg = idap_fx.analyze(gm)
    (group,) = [g for g in dg.prunable if any(m.param == "a.weight" for m in g.members)]
    plan = {group.id: plan_units}
    after = idap_fx.prune(gm, plan, dg)
    changed = compensate(gm, after, dg, plan, ScoringContext(gm, dg, batches).sites, mode, batches)
    return gm, after, changed


def test_reconstruct_refits_the_layers_downstream_and_beats_least_squares_on_held_out_data() -> None:
    """Least squares fixes the one consumer of the removed channels from the old inputs; ``reconstruct`` then
    re-fits every layer after it on the inputs the pruned model gives it (the nonlinear chain)."""
    cal, held_out = _batches(8, 0), _batches(4, 9)
    gm, lsq, n_lsq = _deep("least_squares", cal, list(range(10)))
    _, rec, n_rec = _deep("reconstruct", cal, list(range(10)))
    assert n_lsq == 1 and n_rec >= 2  # b (the consumer) and layers after it
    assert _rel_error(gm, rec, held_out) < 0.8 * _rel_error(gm, lsq, held_out)
    assert not torch.equal(rec.state_dict()["c.weight"], gm.state_dict()["c.weight"])


def test_reconstruct_leaves_layers_the_data_cannot_improve() -> None:
    """A layer upstream of every change (``a``: same inputs, it keeps its rows' outputs exactly) is left as
    it was; with a single calibration batch there is no held-out fold, so nothing is re-fitted."""
    cal = _batches(4, 0)
    gm, after, _ = _deep("reconstruct", cal, [1, 4])
    kept = [k for k in range(16) if k not in (1, 4)]
    torch.testing.assert_close(
        after.state_dict()["a.weight"], gm.state_dict()["a.weight"][kept], rtol=0, atol=0
    )
    gm, lsq, _ = _deep("least_squares", cal[:1], [1, 4])
    _, one, n = _deep("reconstruct", cal[:1], [1, 4])
    assert n == 1  # the least-squares consumer only
    for k, v in lsq.state_dict().items():
        torch.testing.assert_close(one.state_dict()[k], v)


def test_reconstruct_holds_at_most_its_memory_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above ``REFIT_MEMORY`` it goes on with two batches, then stops: with no room at all the result is
    least squares alone; with room for two batches it still re-fits."""
    cal = _batches(8, 0)
    _, lsq, _ = _deep("least_squares", cal, list(range(10)))
    monkeypatch.setattr(compensation, "REFIT_MEMORY", 0)
    _, capped, n = _deep("reconstruct", cal, list(range(10)))
    assert n == 1
    for k, v in lsq.state_dict().items():
        torch.testing.assert_close(capped.state_dict()[k], v)
    one_batch = 8 * 16 * 10 * 10 * 4  # the largest activation of one batch
    monkeypatch.setattr(compensation, "REFIT_MEMORY", 2 * 3 * one_batch)
    _, two, n = _deep("reconstruct", cal, list(range(10)))
    assert n >= 2


def test_auto_reconstructs_from_enough_calibration_samples() -> None:
    """``auto`` (the default) re-fits with ``RECONSTRUCT_MIN_SAMPLES`` samples or more (counted over
    processes), and stops at least squares below: the step notes name the mode that ran."""
    few, many = _batches(2, 0), _batches(40, 0)  # 16 and 320 samples
    assert compensation.resolve("auto", few) == "least_squares"
    assert compensation.resolve("auto", many) == "reconstruct"
    assert compensation.resolve("mean", many) == "mean"
    torch.manual_seed(0)
    res = idap_fx.optimize(_Deep().eval(), few[0], calibration=few, target_macs=0.6, budget=None, quiet=True)
    assert "(least_squares)" in " ".join(s["note"] for s in res.report.steps)
