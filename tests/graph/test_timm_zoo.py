"""timm models (``pretrained=False``) under idap_fx: one per family, in the slow suite.

The same check as ``bench/timm_zoo.py`` (which writes the per-family table in
``docs/zoo.md``): a random 30 % plan over the exact groups matches the mask oracle, and a
30 % plan over every prunable group removes at least 20 % of the parameters. The list
holds the families measured to pass; the bench covers the rest.
"""

from __future__ import annotations

import pytest
import torch
from helpers import random_plan, rel_err

import idap_fx

timm = pytest.importorskip("timm")

MODELS = {  # family: its model in bench/timm_zoo.py (passing there; those under 8 M parameters)
    "byobnet": "test_byobnet",
    "cspnet": "cs3darknet_focus_s",  # BatchNormAct2d: F.batch_norm on get_attr weights
    "deit": "deit_tiny_patch16_224",
    "densenet": "densenet121",
    "efficientnet": "test_efficientnet",
    "fastvit": "fastvit_t8",
    "ghostnet": "ghostnet_050",
    "levit": "levit_128s",  # bn(x.flatten(0, 1)).reshape_as(x)
    "mobilenetv3": "mobilenetv3_small_050",
    "nfnet": "test_nfnet",  # weight standardisation: F.batch_norm on the weight, reshape_as
    "repvit": "repvit_m1",
    "resnet": "test_resnet",
    "rexnet": "rexnet_100",
    "xcit": "xcit_nano_12_p8_224",  # pos.repeat(B, 1, 1, 1), F.normalize over head_dim
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS.values()))
def test_timm_family_prunes_exactly(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    with torch.no_grad():  # as the bench: near-zero inits (layer scale) would hide what the plan changes
        for p in model.parameters():
            if p.numel() and p.abs().max() < 1e-4:
                p.uniform_(0.5, 1.5)
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    gm = idap_fx.trace(model, x)
    dg = idap_fx.analyze(gm)
    exact = {g.id for g in dg.prunable if g.exact}
    plan = {k: v for k, v in random_plan(dg, 0.3).items() if k in exact}
    assert plan
    pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
    with torch.no_grad():
        out_p, out_m = pruned(x), masked(x)
        assert rel_err(out_p, out_m) <= 1e-4
        assert rel_err(out_p, gm(x)) > 1e-3
        pruned_all = idap_fx.prune(gm, random_plan(dg, 0.3), dg)
        assert pruned_all(x).shape == out_p.shape
    params = sum(p.numel() for p in model.parameters())
    assert 1 - sum(p.numel() for p in pruned_all.parameters()) / params >= 0.2
