"""``torch.export`` input: ``idap_fx.capture.torch_export.from_exported`` graphs analyse and prune like fx-traced ones.

The foundation zoo's small CNNs (ResNet-18, MobileNetV2: residual adds, depthwise
convolutions, BN, pooling, the classifier) in the export IR and in core ATen, and
Hugging Face BERT / GPT-2 exported from their Config classes: the same prunable groups
as the fx path, and the prune == mask oracle.
"""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
import torchvision
from helpers import expected_param_shapes, random_plan, rel_err
from torch import nn

import idap_fx
from idap_fx.capture.torch_export import from_exported
from idap_fx.errors import TraceError


def _oracle(gm: torch.fx.GraphModule, dg: idap_fx.DependencyGraph, plan: dict, *args, **kwargs) -> None:
    pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
    with torch.no_grad():
        out_p, out_m, out_0 = pruned(*args, **kwargs), masked(*args, **kwargs), gm(*args, **kwargs)
    assert rel_err(out_p, out_m) <= 1e-4
    assert rel_err(out_p, out_0) > 1e-3
    shapes = expected_param_shapes(gm, dg.expected_numel(plan))
    assert {k: tuple(v.shape) for k, v in pruned.state_dict().items()} == shapes


@pytest.mark.parametrize("core_aten", [False, True], ids=["export_ir", "core_aten"])
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_zoo_cnn_exported_matches_fx_groups_and_prune_equals_mask(name: str, core_aten: bool) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(model, (x,))
    if core_aten:  # convolution, _native_batch_norm_legit_no_training, addmm, mean ...
        program = program.run_decompositions()
    gm = from_exported(program)
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) <= 1e-6
    dg = idap_fx.analyze(gm)
    assert not dg.boundaries
    fx_dg = idap_fx.analyze(idap_fx.trace(model, x))
    assert sorted(g.size for g in dg.prunable) == sorted(g.size for g in fx_dg.prunable)
    assert sorted(g.exact for g in dg.prunable) == sorted(g.exact for g in fx_dg.prunable)
    classifier = [g for g in dg.groups if g.size == 1000]
    assert classifier and not any(g.prunable for g in classifier)  # the output width stays
    _oracle(gm, dg, random_plan(dg, 0.4, seed=1), x)


def test_depthwise_groups_argument_follows_the_channels() -> None:
    model = torchvision.models.mobilenet_v2(weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    gm = from_exported(torch.export.export(model, (x,)))
    dg = idap_fx.analyze(gm)
    group = next(g for g in dg.prunable if any(m.param == "features.2.conv.1.0.weight" for m in g.members))
    pruned = idap_fx.prune(gm, {group.id: list(range(0, group.size, 2))}, dg)
    weight = next(
        n for n in pruned.graph.nodes if n.op == "get_attr" and n.target == "features.2.conv.1.0.weight"
    )
    (dw,) = weight.users
    assert dw.args[-1] == group.size // 2 == pruned.get_parameter("features.2.conv.1.0.weight").shape[0]
    assert pruned(x).shape == (1, 1000)


def test_dynamic_batch_survives_pruning() -> None:
    """Exported with a symbolic batch dim, the pruned graph runs at another batch size."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 32, 32)
    batch = torch.export.Dim("batch", min=1, max=64)
    gm = from_exported(torch.export.export(model, (x,), dynamic_shapes=({0: batch},)))
    dg = idap_fx.analyze(gm)
    assert not dg.boundaries and len(dg.prunable) == 12
    _oracle(gm, dg, random_plan(dg, 0.3, seed=4), torch.randn(5, 3, 32, 32))


def test_trace_accepts_an_exported_program() -> None:
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    gm = idap_fx.trace(torch.export.export(model, (x,)), x)
    assert len(idap_fx.analyze(gm).prunable) == 12


def test_bad_inputs_are_trace_errors() -> None:
    with pytest.raises(TraceError, match="ExportedProgram or its GraphModule"):
        from_exported(nn.Linear(2, 2))
    program = torch.export.export(
        nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), (torch.randn(3, 4),)
    )
    with pytest.raises(TraceError, match="pass example_inputs"):
        from_exported(program.module())
    gm = from_exported(program.module(), torch.randn(3, 4))
    assert idap_fx.analyze(gm).prunable[0].size == 8


@pytest.fixture(scope="module")
def transformers() -> ModuleType:
    return pytest.importorskip("transformers")


def _text(batch: int = 2, seq: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq - 2 :] = 0
    return {"input_ids": torch.randint(0, 100, (batch, seq), generator=g), "attention_mask": mask}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bert_exported_heads_and_mlp(transformers: ModuleType, attn: str) -> None:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, attn_implementation=attn,
    )  # fmt: skip
    model = transformers.BertModel(cfg).eval()
    inputs = _text()
    gm = from_exported(torch.export.export(model, (), inputs))
    dg = idap_fx.analyze(gm)
    assert not dg.boundaries
    sizes = {g.id.split("_weight")[0]: g.size for g in dg.prunable}
    assert sizes == {
        "encoder_layer_0_attention_self_query": 4, "encoder_layer_0_intermediate_dense": 64,
        "encoder_layer_1_attention_self_query": 4, "encoder_layer_1_intermediate_dense": 64,
    }  # fmt: skip
    _oracle(gm, dg, random_plan(dg, 0.5, seed=2), **inputs)


def test_gpt2_exported_heads_and_mlp(transformers: ModuleType) -> None:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32, use_cache=False
    )
    model = transformers.GPT2Model(cfg).eval()
    inputs = _text()
    gm = from_exported(torch.export.export(model, (), inputs))
    dg = idap_fx.analyze(gm)
    assert sorted(g.size for g in dg.prunable) == [4, 4, 128, 128]
    _oracle(gm, dg, random_plan(dg, 0.5, seed=2), **inputs)


class _SlopedHeads(nn.Module):
    """A per-head bias computed from constants (ALiBi-style slopes), a random draw and a parameter."""

    def __init__(self, heads: int = 4, dim: int = 8) -> None:
        super().__init__()
        self.heads, self.dim = heads, dim
        self.q, self.k, self.v = (nn.Linear(16, heads * dim) for _ in range(3))
        self.out = nn.Linear(heads * dim, 16)
        self.scale = nn.Parameter(torch.ones(heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.heads, self.dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        slopes = torch.pow(torch.tensor(0.5), torch.arange(1, self.heads + 1, dtype=torch.float32))
        bias = (slopes * self.scale)[:, None, None] * torch.ones(t, t)
        noise = torch.rand(t, t) * 0  # random: must stay in the graph
        att = (q @ k.transpose(-1, -2) + bias + noise).softmax(-1)
        return self.out((att @ v).transpose(1, 2).reshape(b, t, -1))


def test_constant_subgraphs_fold_into_buffers_that_the_heads_slice() -> None:
    """Capture folds ``pow(0.5, arange(...))`` into a buffer (not the parameter, not ``rand``, not the uniform
    ``ones``); the result computes the same values and its per-head bias is pruned with the heads."""
    from idap_fx.capture.constants import fold_constants

    x = torch.randn(2, 5, 16)
    model = _SlopedHeads().eval()
    gm = torch.export.export(model, (x,), strict=False).run_decompositions({}).module()
    assert fold_constants(gm)
    names = [
        n.target.__name__ for n in gm.graph.nodes if n.op == "call_function" and hasattr(n.target, "__name__")
    ]
    assert not any(n.startswith("arange") for n in names), names
    assert any(n.startswith("rand") for n in names) and any(n.startswith("ones") for n in names), names
    assert dict(gm.named_parameters()).keys() == dict(model.named_parameters()).keys()
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) <= 1e-6
    exported = from_exported(torch.export.export(model, (x,), strict=False))
    dg = idap_fx.analyze(exported)
    heads = [g for g in dg.prunable if g.exact and g.size == 4]
    assert len(heads) == 1, [(g.id, g.size, g.frozen_reason) for g in dg.groups]
    plan = {heads[0].id: [0, 2]}
    pruned, masked = idap_fx.prune(exported, plan, dg), idap_fx.mask(exported, plan, dg)
    with torch.no_grad():
        assert rel_err(pruned(x), masked(x)) <= 1e-5 and rel_err(pruned(x), model(x)) > 1e-3


class _TwoLayersOneBias(nn.Module):
    """Two attention layers reading one computed per-head bias (as Bloom's ALiBi)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_SlopedHeads() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slopes = torch.pow(torch.tensor(0.5), torch.arange(1, 5, dtype=torch.float32))[:, None, None]
        for layer in self.layers:
            b, t, _ = x.shape
            q, k, v = (p(x).view(b, t, 4, 8).transpose(1, 2) for p in (layer.q, layer.k, layer.v))
            att = (q @ k.transpose(-1, -2) + slopes).softmax(-1)
            x = x + layer.out((att @ v).transpose(1, 2).reshape(b, t, -1))
        return x


@pytest.mark.parametrize("untie_bytes", [0, None])
def test_a_small_shared_bias_is_copied_per_layer(
    monkeypatch: pytest.MonkeyPatch, untie_bytes: int | None
) -> None:
    """Copied per consumer (within ``UNTIE_BYTES``) each layer prunes its own heads; kept shared, one head
    group spans both layers. Either way prune == mask."""
    from idap_fx.capture import constants

    if untie_bytes is not None:
        monkeypatch.setattr(constants, "UNTIE_BYTES", untie_bytes)
    x = torch.randn(2, 5, 16)
    model = _TwoLayersOneBias().eval()
    gm = from_exported(torch.export.export(model, (x,), strict=False))
    dg = idap_fx.analyze(gm)
    heads = [g for g in dg.prunable if g.exact and g.size == 4]
    assert len(heads) == (1 if untie_bytes == 0 else 2), [(g.id, g.size) for g in dg.groups]
    plan = {heads[0].id: [1, 2]}
    pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
    with torch.no_grad():
        assert rel_err(pruned(x), masked(x)) <= 1e-5 and rel_err(pruned(x), model(x)) > 1e-3


class _CSPBlock(nn.Module):
    """ultralytics' C2f: ``list(x.chunk(2, 1))`` extended by bottlenecks and concatenated, which
    ``torch.fx`` cannot trace (a Proxy cannot be iterated) and ``torch.export`` can."""

    def __init__(self, c: int = 16, n: int = 2) -> None:
        super().__init__()
        self.cv1, self.cv2 = nn.Conv2d(c, c, 1), nn.Conv2d((2 + n) * (c // 2), c, 1)
        self.m = nn.ModuleList(nn.Conv2d(c // 2, c // 2, 3, padding=1) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(torch.relu(self.cv1(x)).chunk(2, 1))
        y.extend(torch.relu(m(y[-1])) for m in self.m)
        return self.cv2(torch.cat(y, 1))


def test_a_block_fx_cannot_trace_says_how_and_prunes_through_torch_export() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), _CSPBlock(), nn.Conv2d(16, 4, 1)).eval()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(TraceError, match="torch.export"):
        idap_fx.trace(model, x)
    gm = idap_fx.trace(torch.export.export(model, (x,)), x)
    dg = idap_fx.analyze(gm)
    chunked = [g for g in dg.groups if any(m.param == "1.cv1.weight" and m.dim == 0 for m in g.members)]
    assert [(g.prunable, g.exact) for g in chunked] == [(True, True)]
    plan = random_plan(dg, 0.4, seed=1)
    pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
    with torch.no_grad():
        assert rel_err(pruned(x), masked(x)) <= 1e-5 and rel_err(pruned(x), gm(x)) > 1e-3
