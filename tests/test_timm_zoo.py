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

MODELS = {  # family: its smallest model (bench/timm_zoo.py's pick)
    "cspnet": "cs3darknet_focus_s",  # BatchNormAct2d: F.batch_norm on get_attr weights
    "resnet": "test_resnet",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS.values()))
def test_timm_family_prunes_exactly(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
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
