"""timm's attention as timm writes it: fused ``qkv.reshape(B, N, 3, heads, head_dim).permute(...).unbind(0)``
and relative position bias tables read by an index tensor (BEiT, Swin). Heads are exact units, checked
with the prune == mask oracle on tiny models (timm 1.0.31, ``pretrained=False``), fused and eager attention.
"""

from __future__ import annotations

import pytest
import torch
from helpers import random_plan, rel_err
from torch import nn

import idap_fx

timm = pytest.importorskip("timm")


def _vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5)


def _beit() -> nn.Module:
    from timm.models.beit import Beit

    return Beit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5,
                use_abs_pos_emb=False, use_rel_pos_bias=True)  # fmt: skip


def _swin() -> nn.Module:
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 1),
                           num_heads=(2, 4), num_classes=5)  # fmt: skip


def _swin_v2() -> nn.Module:
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    # cosine attention (F.normalize over head_dim), a continuous position bias MLP, B_, N, C read off a
    # tensor whose channels are not the heads'
    return SwinTransformerV2(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 1),
                             num_heads=(2, 4), num_classes=5)  # fmt: skip


MODELS = {"vit": (_vit, "blocks.0.attn", 4), "beit": (_beit, "blocks.0.attn", 4),
          "swin": (_swin, "layers.0.blocks.1.attn", 2), "swin_v2": (_swin_v2, "layers.0.blocks.1.attn", 2)}  # fmt: skip


def _randomise(model: nn.Module) -> nn.Module:
    """Unit-variance layers, non-zero biases and tables, so removing a head visibly changes the output."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):  # Swin v2's post-norms start at zero
                p.uniform_(0.5, 1.5)
            elif "relative_position" in name or p.dim() == 1:
                p.uniform_(-0.5, 0.5)
            elif p.dim() >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5)
    return model.eval()


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "eager"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_timm_heads_are_exact_units(name: str, fused: bool) -> None:
    build, attn, heads = MODELS[name]
    if name == "swin" and fused:
        # known limit: under sdpa a shifted window's mask is expanded to a literal head count, which pins the
        # heads of shifted blocks (blocks.1); the unshifted block's heads are exact
        attn = "layers.0.blocks.0.attn"
    model = _randomise(build())
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    gm = idap_fx.trace(model, x)
    dg = idap_fx.analyze(gm)
    (group,) = [
        g for g in dg.groups if any(m.param == f"{attn}.qkv.weight" and m.dim == 0 for m in g.members)
    ]
    assert group.prunable and group.exact and group.size == heads, group.frozen_reason
    exact = {g.id for g in dg.prunable if g.exact}
    plan = {k: v for k, v in random_plan(dg, 0.4, seed=2).items() if k in exact} | {group.id: [0]}
    pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
    state = pruned.state_dict()
    width = model.get_submodule(f"{attn}.qkv").in_features
    assert state[f"{attn}.qkv.weight"].shape[0] == 3 * width * (heads - 1) // heads
    table = f"{attn}.relative_position_bias_table"
    if table in state:  # the per-head bias table loses the removed head's column
        assert state[table].shape[1] == heads - 1
    with torch.no_grad():
        assert rel_err(pruned(x), masked(x)) <= 1e-4
        assert rel_err(pruned(x), gm(x)) > 1e-3


def test_unbinding_a_channel_dim_freezes_it() -> None:
    class Unbind(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, b = self.fc(x).reshape(x.shape[0], 4, 2).unbind(2)  # q|k-like pairs inside every channel
            c, d = self.fc(x).unbind(1)[:2]  # one tensor per channel: the channels freeze
            return a * b + c.unsqueeze(1) + d.unsqueeze(1)

    x = torch.randn(3, 6)
    dg = idap_fx.analyze(idap_fx.trace(Unbind().eval(), x))
    (group,) = [g for g in dg.groups if any(m.param == "fc.weight" and m.dim == 0 for m in g.members)]
    assert not group.prunable and "unbinds channels" in (group.frozen_reason or "")
