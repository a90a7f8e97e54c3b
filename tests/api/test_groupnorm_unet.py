"""A diffusion-style GroupNorm UNet: whole GroupNorm groups are exact units, so optimize reaches its MACs target.

Conv, GroupNorm, SiLU residual blocks, a strided-conv down-sampling, a nearest up-sampling
and a skip concatenation. Before whole GroupNorm groups were units, every group here was
inexact and ``optimize(target_macs=0.7)`` without ``prune_inexact`` removed nothing (MACs 1.0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from helpers import random_plan, rel_err
from torch import nn

import idap_fx


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int = 32) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class TinyUNet(nn.Module):
    def __init__(self, c: int = 64) -> None:
        super().__init__()
        self.inp = nn.Conv2d(3, c, 3, padding=1)
        self.down_block = ResBlock(c, c)
        self.down = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.mid = ResBlock(2 * c, 2 * c)
        self.up = nn.Conv2d(2 * c, c, 3, padding=1)
        self.up_block = ResBlock(2 * c, c)
        self.out_norm, self.out = nn.GroupNorm(32, c), nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.down_block(self.inp(x))
        h = self.mid(self.down(skip))
        h = self.up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.up_block(torch.cat([h, skip], 1))
        return self.out(F.silu(self.out_norm(h)))


def _unet() -> TinyUNet:
    torch.manual_seed(0)
    model = TinyUNet().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def test_unet_groups_are_exact_and_prune_equals_mask() -> None:
    x = torch.randn(2, 3, 16, 16)
    gm = idap_fx.trace(_unet(), x)
    dg = idap_fx.analyze(gm)
    assert not dg.boundaries
    assert dg.prunable and all(g.exact for g in dg.prunable)
    # units are GroupNorm groups: 32 per width; the skip stream and the up conv meet up_block.norm1's
    # groups of 4 channels (it normalises their concatenation), so they have 16 units of 4
    assert sorted(g.size for g in dg.prunable) == [16, 16, 32, 32, 32, 32, 32]
    plan = random_plan(dg, 0.4)
    pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
    with torch.no_grad():
        assert rel_err(pruned(x), masked(x)) <= 1e-5
    again = idap_fx.analyze(pruned)  # the rewritten GroupNorms keep whole groups
    assert all(g.exact for g in again.prunable)


def test_optimize_reaches_the_macs_target_without_prune_inexact() -> None:
    x = torch.randn(4, 3, 16, 16)
    calibration = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    result = idap_fx.optimize(_unet(), x, calibration=calibration, target_macs=0.7, budget=None, quiet=True)
    ratio = result.report.macs_after / result.report.macs_before
    assert abs(ratio - 0.7) <= 0.03, ratio
    assert result.report.target_reached
