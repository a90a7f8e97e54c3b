"""A quick end-to-end check of trace -> analyze -> prune/mask on ResNet-18 and MobileNetV2."""

import torch
import torchvision

import idap_fx


def _half_plan(dg):
    plan = {}
    for g in dg.prunable:
        idx = list(range(0, g.size, 2))
        while idx and g.violated_part(idx):
            idx.pop()
        if idx:
            plan[g.id] = idx
    return plan


def test_resnet18_and_mobilenet_v2_prune_equals_mask():
    torch.manual_seed(0)
    for name in ("resnet18", "mobilenet_v2"):
        model = torchvision.models.get_model(name, weights=None).eval()
        x = torch.randn(2, 3, 64, 64)
        gm = idap_fx.trace(model, x)
        dg = idap_fx.analyze(gm)
        plan = _half_plan(dg)
        assert len(plan) >= 10
        pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
        with torch.no_grad():
            yp, ym = pruned(x), masked(x)
        assert yp.shape == (2, 1000)
        assert (yp - ym).abs().max() <= 1e-5 * ym.abs().max()
        assert sum(p.numel() for p in pruned.parameters()) < 0.6 * sum(p.numel() for p in gm.parameters())


def test_model_returning_a_tuple_prunes_and_keeps_output_shapes():
    class TwoHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Conv2d(3, 8, 1)
            self.b, self.c = torch.nn.Conv2d(8, 4, 1), torch.nn.Conv2d(8, 2, 1)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.b(h), self.c(h)

    x = torch.randn(2, 3, 4, 4)
    gm = idap_fx.trace(TwoHeads(), x)
    dg = idap_fx.analyze(gm)
    pruned, masked = idap_fx.prune(gm, {"a": [0, 1]}, dg), idap_fx.mask(gm, {"a": [0, 1]}, dg)
    with torch.no_grad():
        (p1, p2), (m1, m2) = pruned(x), masked(x)
    assert p1.shape == (2, 4, 4, 4) and p2.shape == (2, 2, 4, 4)
    assert torch.allclose(p1, m1, atol=1e-6) and torch.allclose(p2, m2, atol=1e-6)
    assert idap_fx.analyze(pruned).group("a").size == 6  # meta shapes stay valid for re-analysis
