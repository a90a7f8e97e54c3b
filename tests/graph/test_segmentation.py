"""torchvision's segmentation models: every group but the input and the class logits is prunable, exactly.

Their heads upsample to ``x.shape[-2:]`` (LR-ASPP also to a backbone feature's ``shape[-2:]``): a
size sliced off a shape depends only on the dims it keeps, so it no longer freezes the channels of
the tensor it was read from. A random plan over every group: prune == mask, shapes as planned.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from helpers import random_plan, rel_err
from torch import nn

import idap_fx

MODELS = ["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "fcn_resnet50", "deeplabv3_resnet50"]


class Logits(nn.Module):
    """The ``out`` map of a torchvision segmentation model (its forward returns a dict)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def check(name: str) -> None:
    torch.manual_seed(0)
    extra = {} if name.startswith("lraspp") else {"aux_loss": False}
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, **extra)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        # fresh statistics make these deep heads output a near-constant map: the oracle would be vacuous
        bn.running_mean.normal_(0, 0.1), bn.running_var.uniform_(0.02, 0.1), bn.bias.data.normal_(0, 0.1)
    x = torch.randn(2, 3, 96, 96)
    gm = idap_fx.trace(Logits(model).eval(), x)
    dg = idap_fx.analyze(gm)
    frozen = {g.id: g.frozen_reason for g in dg.groups if not g.prunable}
    assert len(frozen) == 2 and all("graph input" in r or "graph output" in r for r in frozen.values()), (
        frozen
    )
    assert all(g.exact for g in dg.prunable)
    plan = random_plan(dg, 0.3, seed=0)
    with torch.no_grad():
        pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
        assert rel_err(pruned(x), masked(x)) <= 1e-5
        assert rel_err(pruned(x), gm(x)) > 1e-3
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in gm.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_segmentation_models_prune_exactly(name: str) -> None:
    check(name)
