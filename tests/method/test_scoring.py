"""Scoring: streamed divergence equals a slow hook-based reference; criteria and unit selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import idap_fx
from idap_fx.errors import IdapError
from idap_fx.method.allocate import Floors, select_units
from idap_fx.method.scoring import score


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        x = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return self.fc(x)


def _model() -> SmallCNN:
    torch.manual_seed(0)
    m = SmallCNN().eval()
    with torch.no_grad():
        m.bn1.running_mean.uniform_(-0.2, 0.2)
        m.bn1.weight.uniform_(0.1, 2.0)
    return m


def _batches(n: int = 3, bs: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(bs, 3, 8, 8, generator=g) for _ in range(n)]


def _reference_cnn(m: SmallCNN, batches: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """The method's formula with plain forward hooks and every activation stored."""
    seen: dict[str, list[torch.Tensor]] = {"conv2": [], "fc": []}
    hooks = [
        m.conv2.register_forward_pre_hook(lambda mod, a: seen["conv2"].append(a[0].detach())),
        m.fc.register_forward_pre_hook(lambda mod, a: seen["fc"].append(a[0].detach())),
    ]
    with torch.no_grad():
        for b in batches:
            m(b)
    for h in hooks:
        h.remove()
    a1 = torch.cat(seen["conv2"]).double()  # (N, 8, 8, 8): what conv1's channels feed
    a2 = torch.cat(seen["fc"]).double().reshape(-1, 6, 16)  # (N, 6, 16): conv2's channels, flattened
    s1 = (
        a1.flatten(2).norm(dim=2).mean(0)
        / a1[0].numel()
        * m.conv1.weight.detach().double().flatten(1).norm(dim=1)
    )
    s2 = a2.norm(dim=2).mean(0) / (6 * 16) * m.conv2.weight.detach().double().flatten(1).norm(dim=1)
    return {"conv1": s1.numpy(), "conv2": s2.numpy()}


def test_divergence_matches_hook_reference_on_cnn() -> None:
    m = _model()
    batches = _batches()
    gm = idap_fx.trace(m, batches[0])
    dg = idap_fx.analyze(gm)
    got = score(gm, dg, batches)
    want = _reference_cnn(m, batches)
    assert set(got) == {"conv1", "conv2"}
    for gid in want:
        np.testing.assert_allclose(got[gid], want[gid], rtol=1e-5)


def test_identical_batches_give_the_scores_of_one() -> None:
    m = _model()
    b = _batches(1)[0]
    gm = idap_fx.trace(m, b)
    dg = idap_fx.analyze(gm)
    one, many = score(gm, dg, [b]), score(gm, dg, [b] * 5)
    for gid in one:
        np.testing.assert_allclose(many[gid], one[gid], rtol=1e-6)


def _small_vit() -> nn.Module:
    torch.manual_seed(0)
    m = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=5
    ).eval()
    nn.init.normal_(m.heads.head.weight, std=0.02)
    return m


def test_attention_head_divergence_matches_reference() -> None:
    """δ_h: E‖O^h‖/numel · ‖W_QKV rows of h‖_F, with O^h from MHA's own attention weights."""
    m = _small_vit()
    batches = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    gm = idap_fx.trace(m, batches[0])
    dg = idap_fx.analyze(gm)
    got = score(gm, dg, batches)
    mha = m.encoder.layers[0].self_attention
    inputs: list[torch.Tensor] = []
    h = m.encoder.layers[0].ln_1.register_forward_hook(lambda mod, a, out: inputs.append(out.detach()))
    with torch.no_grad():
        for b in batches:
            m(b)
    h.remove()
    x = torch.cat(inputs)  # (N, L, E), batch first
    with torch.no_grad():
        _, w = mha(x, x, x, need_weights=True, average_attn_weights=False)  # (N, H, L, L)
        e = mha.embed_dim
        v = x @ mha.in_proj_weight[2 * e :].T + mha.in_proj_bias[2 * e :]
        v = v.reshape(x.shape[0], x.shape[1], 4, e // 4).transpose(1, 2)  # (N, H, L, d)
        o = (w @ v).double()  # per-head outputs
    numel = x.shape[1] * e
    rows = mha.in_proj_weight.detach().double().reshape(3, 4, e // 4, e)
    wnorm = rows.permute(1, 0, 2, 3).reshape(4, -1).norm(dim=1)
    want = o.flatten(2).norm(dim=2).mean(0) / numel * wnorm
    gid = next(g.id for g in dg.prunable if g.id.endswith("encoder_layer_0_self_attention:heads"))
    np.testing.assert_allclose(got[gid], want.numpy(), rtol=1e-4)


def test_other_criteria() -> None:
    m = _model()
    batches = _batches()
    gm = idap_fx.trace(m, batches[0])
    dg = idap_fx.analyze(gm)
    l1 = score(gm, dg, batches, "l1")
    np.testing.assert_allclose(
        l1["conv1"], m.conv1.weight.detach().abs().flatten(1).mean(1).numpy(), rtol=1e-6
    )
    bn = score(gm, dg, batches, "bn_scale")
    np.testing.assert_allclose(bn["conv1"], m.bn1.weight.detach().abs().numpy(), rtol=1e-6)
    assert np.isinf(bn["conv2"]).all()  # no BatchNorm: never chosen by network slimming
    r1, r2 = score(gm, dg, batches, "random", seed=3), score(gm, dg, batches, "random", seed=3)
    np.testing.assert_array_equal(r1["conv2"], r2["conv2"])
    taylor = score(gm, dg, batches, "taylor", loss_fn=lambda model, b: model(b).pow(2).mean())
    assert all(np.isfinite(v).all() and (v >= 0).all() for v in taylor.values())
    assert all(p.grad is None for p in gm.parameters())
    with pytest.raises(IdapError, match="loss_fn"):
        score(gm, dg, batches, "taylor")
    with pytest.raises(IdapError, match="unknown importance"):
        score(gm, dg, batches, "nope")


def test_select_units_ranks_globally_with_floors() -> None:
    m = _model()
    gm = idap_fx.trace(m, _batches(1)[0])
    groups = idap_fx.analyze(gm).prunable
    scores = {"conv1": np.arange(8, dtype=float) + 0.5, "conv2": np.array([0.0, 10, 10, 10, 0.1, 10])}
    plan = select_units(scores, groups, 3)
    assert plan == {"conv1": [0], "conv2": [0, 4]}
    # floors: never below min_channels
    plan = select_units(scores, groups, 100, min_channels=3)
    assert len(plan["conv1"]) == 5 and len(plan["conv2"]) == 3
    # round_to: kept widths are multiples of 4, or of a smaller power of two for groups narrower than 16
    plan = select_units(scores, groups, 5, round_to=4)
    assert plan
    for g in groups:
        step = Floors(round_to=4).align(g.channels, 1)
        assert step == {8: 2, 6: 1}[g.size]
        assert (g.size - len(plan.get(g.id, []))) % step == 0
