"""Recovery that cannot make things worse: best held-out state, early stop, the callback's before / after,
what the report says recovery bought, and pruned models that still train."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import idap_fx
from idap_fx.method.budget import Budget
from idap_fx.method.recovery import distill, held_out_loss, recoverability, run_fine_tune


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 24, 3, padding=1),
        nn.BatchNorm2d(24),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(24, 10),
    ).eval()


def _batches(n: int, seed: int, batch: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 12, 12, generator=g) for _ in range(n)]


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _noisy_labels(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [(x, torch.randint(0, 10, (x.shape[0],), generator=g)) for x in _batches(n, seed=3)]


def _damaged_student() -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """(teacher, a copy of it with noise on every parameter): a student with something to learn back."""
    x = torch.randn(1, 3, 12, 12)
    teacher = idap_fx.trace(_net(), (x,))
    student = idap_fx.trace(teacher, (x,))
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return teacher, student


def test_distillation_that_hurts_held_out_keeps_the_starting_weights() -> None:
    # the failure: distilling the unpruned model on a few batches (here: random labels, high lr)
    # moves it away from the original on unseen data; recovery must hand back the starting weights
    teacher = idap_fx.trace(_net(), (torch.randn(1, 3, 12, 12),))
    student = idap_fx.trace(teacher, (torch.randn(1, 3, 12, 12),))
    budget = Budget(teacher, None, _batches(2, seed=1))
    start = _state(student)
    rec = distill(
        student, teacher, _noisy_labels(12), steps=12, lr=1e-2, measure=budget.held_out, eval_every=2,
        patience=2,
    )  # fmt: skip
    assert rec.before == 0.0 and rec.after == 0.0 and rec.kept_step == 0
    assert _same(_state(student), start)
    assert rec.steps == 4 and rec.stop.startswith("no held-out improvement")  # patience 2 at steps 2 and 4
    assert budget.held_out(student) == 0.0

    unguarded = idap_fx.trace(teacher, (torch.randn(1, 3, 12, 12),))
    distill(unguarded, teacher, _noisy_labels(12), steps=12, lr=1e-2)
    assert budget.held_out(unguarded) > 0.01  # without the measure it does get worse: the test can fail


def test_distillation_keeps_its_best_state_and_batchnorm_statistics() -> None:
    teacher, student = _damaged_student()
    budget = Budget(teacher, None, _batches(2, seed=1))
    bn = {k: v.clone() for k, v in student.state_dict().items() if "running" in k}
    rec = distill(
        student, teacher, _batches(20, seed=5), steps=20, lr=1e-3, measure=budget.held_out, patience=5
    )
    assert rec.before is not None and rec.after is not None
    assert rec.after < rec.before and 0 < rec.kept_step <= 20
    assert abs(budget.held_out(student) - rec.after) < 1e-9  # the returned weights are the ones measured best
    assert all(
        torch.equal(v, student.state_dict()[k]) for k, v in bn.items()
    )  # measuring did not unfreeze BN
    assert not student.training


def test_recoverability_probes_a_copy_seeded_and_never_above_the_start() -> None:
    """The probe ``auto`` ranks by: the student is untouched, the value is the best held-out loss seen
    (never above the starting one), the same for the same seed, and lower for a damaged model that learns back."""
    teacher, student = _damaged_student()
    start = _state(student)
    after = held_out_loss(teacher, _batches(2, seed=1))
    first = after(student)
    value = recoverability(student, teacher, _batches(2, seed=5), after, seed=1)
    assert _same(_state(student), start)
    assert value < first  # the damaged student does learn back within the probe
    assert value == recoverability(student, teacher, _batches(2, seed=5), after, seed=1)
    assert recoverability(teacher, teacher, _batches(2, seed=5), after) <= after(teacher) < 1e-6


def test_fine_tune_callback_is_measured_and_the_better_model_kept() -> None:
    x = torch.randn(1, 3, 12, 12)
    teacher = idap_fx.trace(_net(), (x,))
    budget = Budget(teacher, None, _batches(2, seed=1))

    def harm(m: nn.Module, _: nn.Module) -> None:
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.5 * torch.randn_like(p))

    model = idap_fx.trace(teacher, (x,))
    start = _state(model)
    out, rec = run_fine_tune(harm, model, teacher, budget.held_out)
    assert rec.stop.startswith("reverted") and rec.kept_step == 0 and rec.before == rec.after == 0.0
    assert out is model and _same(_state(out), start)

    noisy = idap_fx.trace(teacher, (x,))
    harm(noisy, teacher)

    def heal(m: nn.Module, t: nn.Module) -> nn.Module:
        return copy.deepcopy(t)  # a different module with the same parameters: the callback may return one

    out, rec = run_fine_tune(heal, noisy, teacher, budget.held_out)
    assert rec.kept_step == 1 and rec.after == 0.0 < rec.before and out is not noisy


def test_report_says_what_recovery_bought() -> None:
    x = torch.randn(1, 3, 12, 12)
    res = idap_fx.optimize(
        _net(),
        x,
        calibration=_batches(4, 0),
        target_macs=0.5,
        budget=None,
        train_loader=_batches(6, 9),
        distill_steps=4,
        quiet=True,
    )
    rec = res.report.recovery
    assert rec and len(rec) == len(res.report.steps)
    assert all(r["pass"] == "prune_channels" and r["method"] == "distill" for r in rec)
    assert all(r["after"] <= r["before"] and r["steps"] <= 4 for r in rec)
    total = res.report.to_dict()["recovery_total"]
    assert total["recoveries"] == len(rec) and total["gain"] >= 0
    assert "| prune_channels | 0 | distill |" in res.report.to_markdown()
    assert "recovery in total" in res.report.to_markdown()


def test_pruned_model_still_trains() -> None:
    x = torch.randn(1, 3, 12, 12)
    res = idap_fx.optimize(_net(), x, calibration=_batches(4, 0), target_macs=0.4, budget=None, quiet=True)
    model = res.model
    assert res.report.macs_ratio < 0.5
    g = torch.Generator().manual_seed(11)
    data, labels = torch.randn(32, 3, 12, 12, generator=g), torch.randint(0, 10, (32,), generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for step in range(60):
        loss = F.cross_entropy(model(data), labels)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            for name, p in model.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
                assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert any(isinstance(m, nn.BatchNorm2d) and m.num_batches_tracked > 0 for m in model.modules())


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = x + self.block(x)
        return self.head(x.mean((2, 3)))


def test_stage_2_recoveries_are_reported() -> None:
    torch.manual_seed(0)
    calls = []

    def fine_tune(m: nn.Module, _: nn.Module) -> None:
        calls.append(1)

    res = idap_fx.optimize(
        _Residual().eval(),
        torch.randn(1, 3, 12, 12),
        calibration=_batches(4, 0),
        passes=("skip_layers",),
        budget=None,
        fine_tune=fine_tune,
        quiet=True,
    )
    assert res.report.removed_layers and calls
    rec = res.report.recovery
    assert [r["at"] for r in rec] == [t["name"] for t in res.report.layer_trials] + ["final"]
    assert all(r["pass"] == "skip_layers" and r["method"] == "fine_tune" for r in rec)
    assert all(r["kept_step"] == 0 and r["stop"].startswith("reverted") for r in rec)  # a no-op is not better


def test_distillation_inside_optimize_is_guarded_by_its_own_loss_on_held_out_batches() -> None:
    """In a pass, distillation's before / after are its KL to the step's teacher on the held-out batches."""
    from idap_fx.method.recovery import held_out_loss

    model = _net()
    cal = _batches(8, seed=1)
    res = idap_fx.optimize(
        model, cal[0][:1], calibration=cal, target_macs=0.6, budget=None, quiet=True,
        train_loader=_batches(6, seed=2), distill_steps=6, allocator="group",
    )  # fmt: skip
    recs = res.report.recovery
    assert recs and all(r["method"] == "distill" for r in recs)
    held = [b for i, b in enumerate(cal) if i % 4 == 3]  # the held-out batches (global index i % 4 == 3)
    # the first step's teacher is the unpruned model: its loss to itself is 0 and a pruned student's is > 0
    assert abs(held_out_loss(idap_fx.trace(model, (cal[0][:1],)), held)(model)) < 1e-6
    assert recs[0]["before"] > 0 and recs[0]["after"] <= recs[0]["before"]
    # a KL, not the budget's relative output MSE: it is the mean KL of the held-out batches
    kl = sum(
        F.kl_div(F.log_softmax(x, -1), F.softmax(y, -1), reduction="batchmean").item()
        for x, y in ((model(b) + 1.0, model(b)) for b in held)
    ) / len(held)
    assert abs(held_out_loss(idap_fx.trace(model, (cal[0][:1],)), held)(lambda b: model(b) + 1.0) - kl) < 1e-6
    assert kl < 1e-6  # a logit shift costs no KL (the output MSE would count it)


def test_distillation_trains_when_the_caller_is_under_no_grad() -> None:
    """Deployment code often wraps everything in ``torch.no_grad()``; recovery (and ``auto``'s probe) still train."""
    x = torch.randn(1, 3, 12, 12)
    teacher = idap_fx.trace(_net(), (x,))
    student = idap_fx.trace(teacher, (x,))
    start = _state(student)
    with torch.no_grad():
        distill(student, teacher, _batches(4, seed=5), steps=4, lr=1e-3)
        res = idap_fx.optimize(
            _net(), (x,), calibration=_batches(4, seed=2), target_macs=0.6, budget=None, quiet=True
        )
    assert not _same(_state(student), start)
    assert any("distillation probe" in n for n in res.report.notes), res.report.notes


def test_micro_batches_take_the_same_step_with_less_memory() -> None:
    """Gradients accumulated over parts of a batch (weighted by their share) equal the whole batch's, with
    labels and feature losses too; an odd batch size leaves a smaller last part."""
    teacher, student = _damaged_student()
    batches = [(x, y) for x, y in _noisy_labels(3)]
    batches[1] = (batches[1][0][:7], batches[1][1][:7])  # 7 samples: parts of 3, 3 and 1
    whole, parts = copy.deepcopy(student), copy.deepcopy(student)
    distill(whole, teacher, batches, steps=3, lr=1e-2)
    distill(parts, teacher, batches, steps=3, lr=1e-2, micro_batch=3)
    a, b = whole.state_dict(), parts.state_dict()
    assert not torch.equal(a["0.weight"], student.state_dict()["0.weight"])  # it trained
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a)
