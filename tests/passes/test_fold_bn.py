"""FoldBatchNorm: eval-mode BatchNorm folded into the preceding Conv/Linear, outputs unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import rel_err, state_hash
from idap_fx.passes.fold_bn import FoldBatchNorm, fold_batchnorm
from torch import fx, nn

import idap_fx
from idap_fx.errors import IdapError

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so a wrong fold cannot pass."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, _BN):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.randn(n, generator=g))
                m.bias.data.copy_(torch.randn(n, generator=g))
    return model.eval()


def _bn_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [
        n
        for n in gm.graph.nodes
        if (n.op == "call_module" and isinstance(gm.get_submodule(n.target), _BN))
        or (n.op == "call_function" and n.target is F.batch_norm)
    ]


class ConvBN(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 1)
        self.bn2 = nn.BatchNorm2d(4, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(F.relu(self.bn(self.conv(x)))))


class LinearBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 12)
        self.bn = nn.BatchNorm1d(12)
        self.out = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.bn(self.fc(x))))


class FunctionalBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3)
        self.register_buffer("mean", torch.randn(6))
        self.register_buffer("var", torch.rand(6) + 0.5)
        self.weight = nn.Parameter(torch.randn(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(self.conv(x), self.mean, self.var, self.weight, None, False, 0.1, 1e-3)


def _check_folded(model: nn.Module, x: torch.Tensor, *, tol: float = 1e-5) -> fx.GraphModule:
    gm = idap_fx.trace(model, x)
    before = state_hash(gm)
    folded = fold_batchnorm(gm, (x,))
    assert _bn_nodes(gm), "the test model must contain BatchNorm"
    assert not _bn_nodes(folded), folded.code
    assert not any(isinstance(m, _BN) for m in folded.modules())
    with torch.no_grad():
        assert rel_err(gm(x), folded(x)) < tol
    assert state_hash(gm) == before, "the pass must not modify its input"
    return folded


@pytest.mark.parametrize("bias", [True, False])
def test_conv_bn_folded(bias: bool) -> None:
    torch.manual_seed(0)
    folded = _check_folded(_randomize_bn(ConvBN(bias)), torch.randn(2, 3, 10, 10))
    assert folded.conv.bias is not None  # the BN shift lands in a (new) conv bias


def test_linear_bn1d_folded() -> None:
    torch.manual_seed(0)
    _check_folded(_randomize_bn(LinearBN()), torch.randn(4, 16))


def test_functional_batch_norm_folded() -> None:
    torch.manual_seed(0)
    _check_folded(FunctionalBN().eval(), torch.randn(2, 4, 9))


def test_resnet18_folded_fully() -> None:
    torch.manual_seed(0)
    _check_folded(_randomize_bn(torchvision.models.resnet18(weights=None)), torch.randn(1, 3, 64, 64))


def test_linear_bn_on_tokens_left_alone() -> None:
    """BatchNorm1d normalises dim 1; after a Linear on (N, L, C) that is not the Linear's channel dim."""

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.bn = nn.BatchNorm1d(5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.fc(x))

    model = _randomize_bn(Tokens())
    x = torch.randn(2, 5, 8)
    gm = idap_fx.trace(model, x)
    result = FoldBatchNorm((x,))(gm)
    assert not result.modified
    assert len(_bn_nodes(result.graph_module)) == 1


def test_bn_after_shared_or_multi_use_conv_left_alone() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + self.conv(y) + y

    model = _randomize_bn(Shared())
    x = torch.randn(1, 4, 5, 5)
    gm = idap_fx.trace(model, x)
    out = fold_batchnorm(gm, (x,))
    assert len(_bn_nodes(out)) == 1
    with torch.no_grad():
        assert rel_err(gm(x), out(x)) == 0.0


def test_training_mode_bn_not_folded() -> None:
    model = ConvBN(bias=True).train()
    x = torch.randn(2, 3, 6, 6)
    gm = idap_fx.trace(model, x)
    gm.train()
    assert not FoldBatchNorm((x,))(gm).modified


def test_requires_graph_module() -> None:
    with pytest.raises(TypeError, match="GraphModule"):
        FoldBatchNorm()(ConvBN(bias=True))


def test_ensures_detects_mutation() -> None:
    gm = idap_fx.trace(_randomize_bn(ConvBN(bias=True)), torch.randn(1, 3, 6, 6))
    p = FoldBatchNorm()
    p.requires(gm)
    with torch.no_grad():
        gm.conv.weight.add_(1.0)
    with pytest.raises(IdapError, match="modified its input"):
        p.ensures(gm)
