"""Shared (tied) weights: one group holding every tied tensor, and prune ≡ mask on it."""

from __future__ import annotations

import pytest
import torch
from helpers import SMALL_X as X
from helpers import Guard, random_plan, rel_err
from torch import nn

import idap_fx
import idap_fx.deploy.onnx_export
from idap_fx.rewrite.surgery import masked_call

# --- shared (tied) weights ------------------------------------------------------------------------


class _LinearTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.shared = nn.Linear(8, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.shared(torch.relu(self.a(x)))
        return self.b(self.shared(torch.relu(y)))


class _TiedLM(nn.Module):
    """Embedding and LM head share one matrix (weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mid(self.emb(tokens))))


class _TiedConvs(nn.Module):
    """Two distinct convs holding one weight tensor: its in and out channels tie three groups into one."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(6, 6, 3, padding=1)
        self.c = nn.Conv2d(6, 6, 3, padding=1)
        self.c.weight = self.b.weight
        self.d = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))


TIED = {
    "linear-used-twice": (_LinearTwice, lambda: torch.randn(2, 6), {"a.weight", "shared.weight", "b.weight"}),
    "embedding-lm-head": (_TiedLM, lambda: torch.randint(0, 10, (2, 5)), {"emb.weight", "mid.weight", "head.weight"}),
    "tied-convs": (_TiedConvs, lambda: X, {"a.weight", "b.weight", "c.weight", "d.weight"}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(TIED))
def test_tied_weights_are_one_group_and_prune_matches_mask(case):
    make, inputs, params = TIED[case]
    torch.manual_seed(0)
    model, x = make().eval(), inputs()
    guard = Guard(model, x)
    gm = idap_fx.trace(model, x)
    dg = idap_fx.analyze(gm)
    (group,) = dg.prunable
    assert {m.param for m in group.members} >= params
    plan = random_plan(dg, 0.5, seed=2)
    pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
    with torch.no_grad():
        assert rel_err(pruned(x), masked(x)) <= 1e-5
        assert rel_err(masked_call(gm, plan, dg)(x), masked(x)) == 0.0  # tied names zeroed once, together
    res = idap_fx.optimize(model, x, target_params=0.8, budget=None, quiet=True, strict=False)
    assert res.report.params_after < res.report.params_before
    guard.intact()


@pytest.mark.parametrize("case", ["embedding-lm-head", "tied-convs"])
def test_prune_keeps_tied_weights_tied(case):
    make, inputs, _ = TIED[case]
    torch.manual_seed(0)
    model, x = make().eval(), inputs()
    gm = idap_fx.trace(model, x)
    n_before = len(list(gm.parameters()))
    pruned = idap_fx.prune(gm, random_plan(idap_fx.analyze(gm), 0.5, seed=2))
    assert len(list(pruned.parameters())) == n_before
