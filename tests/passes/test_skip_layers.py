"""Stage 2 (skip_layers): candidates, the zeroed-branch oracle, divergence order, projections, optimize."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from helpers import random_plan, zero_branch
from idap_fx.passes.base import PassContext
from idap_fx.passes.skip_layers import SkipLayers
from torch import nn

import idap_fx
from idap_fx.deploy.onnx_export import export_onnx
from idap_fx.method.budget import Budget
from idap_fx.method.skip_scores import layer_scores
from idap_fx.options import SkipOptions
from idap_fx.rewrite.skip_candidates import EPS, find_candidates, remove
from idap_fx.rewrite.surgery import prune

# (builder kwargs, input size, residual candidates expected: the blocks with an identity skip)
ZOO = {
    "resnet18": ({}, 64, 5),
    "resnet50": ({}, 64, 12),
    "mobilenet_v2": ({}, 64, 10),
    "efficientnet_b0": ({}, 64, 9),
    "convnext_tiny": ({}, 64, 18),
    "vit_b_16": ({"image_size": 64}, 64, 24),
    "swin_t": ({}, 64, 24),
}
_TRACED: dict[str, tuple[torch.fx.GraphModule, torch.Tensor]] = {}


def _zoo(name: str) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    if name not in _TRACED:
        kw, size, _ = ZOO[name]
        torch.manual_seed(0)
        x = torch.randn(2, 3, size, size)
        _TRACED[name] = (idap_fx.trace(getattr(torchvision.models, name)(weights=None, **kw), x[:1]), x)
    return _TRACED[name]


def _check_oracle(gm: torch.fx.GraphModule, x: torch.Tensor, cand) -> None:
    skipped = remove(gm, cand, (x[:1],))
    with torch.no_grad():
        got, want = skipped(x), zero_branch(gm, cand)(x)
    assert torch.equal(got, want), f"{cand.name}: skipping != zeroing the branch"
    names = {n.name for n in skipped.graph.nodes}
    assert not names & set(cand.nodes), f"{cand.name}: branch nodes left in the graph"
    outside = {n.target for n in gm.graph.nodes if n.op == "call_module" and n.name not in cand.nodes}
    gone = {n.target for n in gm.graph.nodes if n.op == "call_module" and n.name in cand.nodes} - outside
    assert not gone & dict(skipped.named_modules()).keys(), f"{cand.name}: unused submodules kept"
    assert sum(p.numel() for p in skipped.parameters()) < sum(p.numel() for p in gm.parameters())


def _sample(cands: list, every: bool) -> list:
    return cands if every else [cands[0], cands[-1]]


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_residual_skip_equals_zeroed_branch(name: str) -> None:
    gm, x = _zoo(name)
    cands = find_candidates(gm, kinds=("residual",))
    assert len(cands) == ZOO[name][2]
    assert len({c.name for c in cands}) == len(cands), "candidate names must be unique"
    for cand in _sample(cands, every=False):
        _check_oracle(gm, x, cand)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_every_residual_candidate_slow(name: str) -> None:
    gm, x = _zoo(name)
    for cand in find_candidates(gm, kinds=("residual",)):
        _check_oracle(gm, x, cand)


def test_stage1_runs_on_skipped_graph_and_onnx_shrinks(tmp_path) -> None:
    gm, x = _zoo("resnet18")
    cands = find_candidates(gm)
    skipped = gm
    for cand in [c for c in cands if c.kind == "residual"][:2]:
        skipped = remove(skipped, cand, (x[:1],))
    chain = next(c for c in find_candidates(skipped) if c.kind == "identity")
    skipped = remove(skipped, chain, (x[:1],))
    dg = idap_fx.analyze(skipped)
    small = prune(skipped, random_plan(dg, 0.3), dg)
    assert small(x).shape == (2, 1000)
    before = export_onnx(gm, x[:1], tmp_path / "a.onnx")
    after = export_onnx(skipped, x[:1], tmp_path / "b.onnx")
    assert after.n_nodes < before.n_nodes
    assert after.max_rel_error <= 1e-4


# --- small models built for the tests ---------------------------------------------------------


class Block(nn.Module):
    """A BasicBlock; ``scale`` multiplies the last BN's weight (tiny scale = almost no flow)."""

    def __init__(self, c: int, scale: float = 1.0) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        with torch.no_grad():
            self.bn2.weight.mul_(scale)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.branch(x))


class Net(nn.Module):
    def __init__(self, scales: tuple[float, ...], c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU())
        self.blocks = nn.Sequential(*[Block(c, s) for s in scales])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


SCALES = (1.0, 1e-4, 1.0, 1.0, 1e-4, 1.0)
TINY = {"blocks.1[conv1..bn2]", "blocks.4[conv1..bn2]"}


def _net(scales: tuple[float, ...] = SCALES) -> tuple[torch.fx.GraphModule, torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16)
    calib = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    return idap_fx.trace(Net(scales), x), x, calib


def _pass(gm, x, calib, limit=None, **kw) -> tuple[SkipLayers, torch.fx.GraphModule]:
    ctx = PassContext(example_inputs=(x,), calibration=calib, budget=Budget(gm, limit, calib[:1]))
    p = SkipLayers(ctx, SkipOptions(**kw))
    return p, p(gm).graph_module


def test_residual_score_is_streamed_mean_ratio() -> None:
    gm, _, calib = _net()
    model = Net(SCALES).eval()
    model.load_state_dict(gm.state_dict())
    cands = find_candidates(gm, kinds=("residual",))
    scores, _ = layer_scores(gm, cands, calib)
    ratios = {f"blocks.{i}[conv1..bn2]": [] for i in range(len(SCALES))}
    with torch.no_grad():
        for xb in calib:
            h = model.stem(xb)
            for i, block in enumerate(model.blocks):
                f = block.branch(h)
                ratios[f"blocks.{i}[conv1..bn2]"] += (
                    f.flatten(1).norm(dim=1) / (h.flatten(1).norm(dim=1) + EPS)
                ).tolist()
                h = block(h)
    assert {c.name for c in cands} == set(ratios)
    for c in cands:
        assert scores[c.key] == pytest.approx(np.mean(ratios[c.name]), rel=1e-5)


def test_identity_chain_is_replaced_by_its_input() -> None:
    gm, x, calib = _net()
    model = Net(SCALES).eval()
    model.load_state_dict(gm.state_dict())
    (cand,) = [c for c in find_candidates(gm) if c.name == "blocks.0[conv2..bn2]"]
    assert cand.kind == "identity" and cand.nodes == ("blocks_0_conv2", "blocks_0_bn2")
    skipped = remove(gm, cand, (x,))
    with torch.no_grad():
        h = model.stem(calib[0])
        b0 = model.blocks[0]
        h = torch.relu(h + torch.relu(b0.bn1(b0.conv1(h))))  # F(x) = its input: conv2 and bn2 gone
        want = model.head(model.blocks[1:](h))
        assert torch.allclose(skipped(calib[0]), want, rtol=1e-5, atol=1e-6)
    assert "blocks.0.conv2" not in dict(skipped.named_modules())


def test_low_flow_blocks_are_removed_first() -> None:
    gm, x, calib = _net()
    p, out = _pass(gm, x, calib, limit=1.0, max_skips=2)
    assert {r["name"] for r in p.record.removed} == TINY
    assert all(r["score"] < 1e-3 and r["kind"] == "residual" for r in p.record.removed)
    assert p.record.stop_reason.startswith("max_skips")
    assert len(list(out.graph.nodes)) == len(list(gm.graph.nodes)) - 2 * 6  # 5 branch nodes + add each


def test_tau_layer_marks_the_rest_essential() -> None:
    gm, x, calib = _net()
    p, out = _pass(gm, x, calib, limit=None, tau_layer=1e-6, max_skips=10)
    assert {r["name"] for r in p.record.removed} == TINY
    rejected = [t for t in p.record.trials if not t["accepted"]]
    assert rejected and all(t["delta"] > 1e-6 and "essential" in t["note"] for t in rejected)
    assert len(p.essential) == len(rejected) == len(find_candidates(out))
    assert p.record.stop_reason.startswith("no candidates left")


def test_budget_rejects_and_keeps_searching() -> None:
    gm, x, calib = _net((1.0, 1.0, 1e-4))
    p, _ = _pass(gm, x, calib, limit=1e-6, max_skips=5)
    assert [r["name"] for r in p.record.removed] == ["blocks.2[conv1..bn2]"]
    assert all(t["budget_consumed"] > 1e-6 for t in p.record.trials if not t["accepted"])


def test_rescored_after_each_accepted_removal(monkeypatch) -> None:
    from idap_fx.passes import skip_layers as mod

    calls = []
    real = mod.layer_scores
    monkeypatch.setattr(mod, "layer_scores", lambda gm, c, cal: calls.append(len(c)) or real(gm, c, cal))
    gm, x, calib = _net()
    p, _ = _pass(gm, x, calib, limit=1.0, max_skips=2)
    assert len(calls) == 1 + len(p.record.removed) and calls[0] > calls[1] > calls[2]


class Inplace(nn.Module):
    """Skip from the model input, followed by an in-place ReLU: removal must not write into the input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.conv(x)) * 2


def test_skip_never_writes_into_the_input() -> None:
    x = torch.randn(1, 3, 8, 8)
    gm = idap_fx.trace(Inplace(), x)
    (cand,) = find_candidates(gm)
    skipped = remove(gm, cand, (x,))
    kept = x.clone()
    assert torch.equal(skipped(x), torch.relu(kept) * 2)
    assert torch.equal(x, kept)


class Shared(nn.Module):
    """A branch whose inner activation also feeds the head: not removable, so not a candidate."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.a(x)
        return x + self.b(h), h.mean()


class Spatial(nn.Module):
    """Chains that change and restore the resolution (stride 2 + upsample, pooling) are never candidates."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.up = nn.Upsample(scale_factor=2)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.up(self.down(x))).sigmoid()


def test_shared_branches_and_spatial_chains_are_not_candidates() -> None:
    x = torch.randn(1, 4, 8, 8)
    assert [c.name for c in find_candidates(idap_fx.trace(Shared(), x))] == ["a", "b"]  # identity chains only
    cands = find_candidates(idap_fx.trace(Spatial(), x), kinds=("residual", "identity", "projection"))
    assert [c.name for c in cands] == ["conv"]  # the stride-1 conv + sigmoid; nothing with down/up


class Widen(nn.Module):
    """A channel-changing chain (conv 8→16 + BN + ReLU, conv 16→16 + BN) between two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.chain = nn.Sequential(
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16),
        )  # fmt: skip
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.chain(self.stem(x)))


def test_projection_fits_the_chain_better_than_zero_or_identity(tmp_path) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 12, 12)
    calib = [torch.randn(8, 3, 12, 12) for _ in range(3)]
    model = Widen().eval()
    gm = idap_fx.trace(model, x)
    assert not [c for c in find_candidates(gm) if c.kind == "projection"], "projection is opt-in"
    cands = [c for c in find_candidates(gm, kinds=("projection",)) if c.name == "chain[0..4]"]
    assert len(cands) == 1
    (cand,) = cands
    scores, fits = layer_scores(gm, [cand], calib)
    new = remove(gm, cand, (x,), fits[cand.key])
    proj = new.get_submodule(f"skip_proj_{cand.exit}")
    assert isinstance(proj, nn.Conv2d) and proj.kernel_size == (1, 1)
    num = den = num_id = 0.0
    with torch.no_grad():
        for xb in calib:
            xs = model.stem(xb)
            y = model.chain(xs)
            num += (y - proj(xs)).pow(2).sum().item()
            num_id += (
                (y - torch.cat([xs, torch.zeros_like(xs)], 1)).pow(2).sum().item()
            )  # zero-padded identity
            den += y.pow(2).sum().item()
    residual = (num / den) ** 0.5
    assert residual == pytest.approx(scores[cand.key], rel=1e-4)  # the score is the measured residual
    assert residual < 0.9 and residual < (num_id / den) ** 0.5 and residual < 1.0  # 1.0: zero
    assert not any(n.target.startswith("chain") for n in new.graph.nodes if n.op == "call_module")
    rep = export_onnx(new, x, tmp_path / "proj.onnx")
    assert rep.max_rel_error <= 1e-4
    dg = idap_fx.analyze(new)
    assert prune(new, random_plan(dg, 0.25), dg)(x).shape == (1, 4)


def test_projection_pass_end_to_end() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 12, 12)
    calib = [torch.randn(8, 3, 12, 12) for _ in range(3)]
    gm = idap_fx.trace(Widen(), x)
    p, out = _pass(gm, x, calib, limit=1.0, max_skips=1, kinds=("projection",))
    assert [r["kind"] for r in p.record.removed] == ["projection"] and p.record.removed[0]["macs_saved"] > 0
    assert out(x).shape == (1, 4)


@pytest.mark.parametrize(
    "passes", [("prune_channels", "skip_layers"), ("skip_layers",), ("skip_layers", "prune_channels")]
)
def test_optimize_with_skip_layers(passes: tuple[str, ...]) -> None:
    torch.manual_seed(0)
    model = Net(SCALES)
    x = torch.randn(1, 3, 16, 16)
    calib = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    target = 0.7 if "prune_channels" in passes else None
    res = idap_fx.optimize(
        model,
        x,
        calibration=calib,
        passes=passes,
        budget=0.05,
        target_macs=target,
        max_skips=2,
        strict=False,
        quiet=True,
    )
    rep = res.report
    assert {r["name"] for r in rep.removed_layers} == TINY
    assert all({"name", "score", "delta", "kind"} <= r.keys() for r in rep.removed_layers)
    assert rep.macs_after < rep.macs_before and rep.budget_consumed <= 0.05
    assert "layer (stage 2)" in rep.to_markdown() and "blocks.1[conv1..bn2]" in rep.to_markdown()
    assert any(k.startswith("skip_") for k in rep.timings)
    assert res.model(x).shape == (1, 10)
    if "prune_channels" in passes:
        assert rep.steps
