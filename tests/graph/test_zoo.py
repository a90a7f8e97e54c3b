"""The torchvision classification zoo: analyze, prune a random 30 % of every prunable group, check.

For each model: (a) the pruned model's output shape is the original's, (b) ``prune``
equals ``mask`` on the exact groups of the plan (the full plan when it is all exact),
(c) every pruned parameter and buffer has the shape ``dg.expected_numel(plan)`` implies,
so the parameter count is what the plan implies. The default run covers the smallest
member of every family; ``-m slow`` runs all 80 models.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from helpers import expected_param_shapes, out_shapes, plan_is_exact, random_plan, rel_err
from torch import fx, nn

import idap_fx

ALL_MODELS = torchvision.models.list_models(module=torchvision.models)

# Longest-prefix match names the family; each family has one member in the default run.
FAMILIES = {
    "alexnet": "alexnet",
    "convnext": "convnext_tiny",
    "densenet": "densenet121",
    "efficientnet_b": "efficientnet_b0",
    "efficientnet_v2": "efficientnet_v2_s",
    "googlenet": "googlenet",
    "inception": "inception_v3",
    "maxvit": "maxvit_t",
    "mnasnet": "mnasnet0_5",
    "mobilenet_v2": "mobilenet_v2",
    "mobilenet_v3": "mobilenet_v3_small",
    "regnet_x": "regnet_x_400mf",
    "regnet_y": "regnet_y_400mf",
    "resnet": "resnet18",
    "resnext": "resnext50_32x4d",
    "shufflenet": "shufflenet_v2_x0_5",
    "squeezenet": "squeezenet1_1",
    "swin_": "swin_t",
    "swin_v2": "swin_v2_t",
    "vgg": "vgg11",
    "vit": "vit_b_16",
    "wide_resnet": "wide_resnet50_2",
}
DEFAULT_MODELS = sorted(FAMILIES.values())

# ViT's position embedding and MaxViT's window partition fix the input at 224x224;
# Inception-v3's stem needs at least 75x75. Everything else runs at 64x64.
INPUT_SIZE = {"inception_v3": 96, "maxvit_t": 224} | {m: 224 for m in ALL_MODELS if m.startswith("vit_")}
RATIO = 0.3
ORACLE_TOL = 1e-5


def family(name: str) -> str:
    """The family a torchvision model name belongs to (the longest matching prefix)."""
    return max((p for p in FAMILIES if name.startswith(p)), key=len)


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    """The model (``weights=None``, eval mode, seeded) and a batch of two example images."""
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    if name.startswith("vit_"):
        # torchvision zero-initialises the ViT head: every output would be 0 and the oracle vacuous.
        nn.init.normal_(model.heads.head.weight, std=0.02)
    size = INPUT_SIZE.get(name, 64)
    return model, torch.randn(2, 3, size, size)


def _numel(shapes: dict[str, tuple[int, ...]], names: set[str]) -> int:
    return sum(math.prod(s) for n, s in shapes.items() if n in names)


def check_model(name: str) -> None:
    """Trace, analyze, prune a random 30 % and assert shapes, the oracle and parameter counts."""
    model, x = build(name)
    gm = idap_fx.trace(model, x)
    del model  # trace copied it; the biggest models need the memory
    dg = idap_fx.analyze(gm)
    plan = random_plan(dg, RATIO, seed=0)
    assert plan, f"{name}: no prunable group ({len(dg.groups)} groups, all frozen)"
    with torch.no_grad():
        y = gm(x)
        pruned = idap_fx.prune(gm, plan, dg)
        y_pruned = pruned(x)
    assert out_shapes(y_pruned) == out_shapes(y)  # (a)
    assert torch.isfinite(y_pruned).all()

    exact_plan = plan if plan_is_exact(dg, plan) else {g: i for g, i in plan.items() if dg.group(g).exact}
    if exact_plan:  # (b)
        with torch.no_grad():
            y_cut = y_pruned if exact_plan is plan else idap_fx.prune(gm, exact_plan, dg)(x)
            y_mask = idap_fx.mask(gm, exact_plan, dg)(x)
        err = rel_err(y_cut, y_mask)
        assert err <= ORACLE_TOL, f"{name}: prune vs mask relative error {err:.2e}"

    expected = expected_param_shapes(gm, dg.expected_numel(plan))  # (c)
    got = {k: tuple(v.shape) for k, v in pruned.state_dict().items()}
    assert got == expected
    param_names = {n for n, _ in pruned.named_parameters(remove_duplicate=False)}
    n_pruned = sum(p.numel() for p in pruned.parameters())
    assert n_pruned == _numel(expected, param_names)
    assert n_pruned < sum(p.numel() for p in gm.parameters())


def test_default_run_covers_every_family():
    assert set(DEFAULT_MODELS) <= set(ALL_MODELS)
    assert len(ALL_MODELS) == 80
    assert {family(m) for m in ALL_MODELS} == set(FAMILIES)
    assert all(family(m) == f for f, m in FAMILIES.items())


@pytest.mark.parametrize("name", DEFAULT_MODELS)
def test_zoo_smallest_of_family(name: str):
    check_model(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL_MODELS)
def test_zoo_all(name: str):
    check_model(name)


def test_check_model_catches_a_broken_prune(monkeypatch):
    """The zoo check is not vacuous: a prune that forgets to slice one layer fails it."""
    real_prune = idap_fx.prune

    def stale_bias_prune(gm: fx.GraphModule, plan, dg=None) -> fx.GraphModule:
        out = real_prune(gm, plan, dg)
        with torch.no_grad():
            out.get_submodule("fc").bias.add_(1.0)
        return out

    monkeypatch.setattr(idap_fx, "prune", stale_bias_prune)
    with pytest.raises(AssertionError, match="prune vs mask"):
        check_model("resnet18")
