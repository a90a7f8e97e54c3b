"""Transformers: attention heads and MLP units are found by the analyzer and pruned exactly.

Hugging Face: small randomly initialised BERT, DistilBERT, GPT-2 and ViT built from
their Config classes (no download) and traced with ``idap_fx.capture.hf.trace_hf``, in both the
sdpa and the eager attention implementation (skipped without ``transformers``).
torchvision: Swin v1/v2 window attention with relative position bias. The oracle:
pruning a random plan over the head and MLP groups gives the same outputs as masking
it (``helpers.rel_err`` <= 1e-4), and the pruned model has the expected parameter shapes.
"""

from __future__ import annotations

import operator
import sys
from types import ModuleType

import pytest
import torch
from helpers import expected_param_shapes, random_plan, rel_err
from torch import nn

import idap_fx
from idap_fx.capture.hf import trace_hf
from idap_fx.errors import TraceError


@pytest.fixture(scope="module")
def transformers():
    """The transformers package (the ``hf`` extra); its tests skip without it."""
    return pytest.importorskip("transformers")


HEADS, HIDDEN, FFN, LAYERS = 4, 32, 64, 2


def _text_inputs(batch: int, seq: int, padded: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(batch * 100 + seq)
    ids = torch.randint(0, 100, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padded and batch > 1:
        mask[1, seq - 2 :] = 0
    return ids, mask


# name -> (build(attn), input names, inputs(batch, seq), head param, FFN param): params hold heads/units on dim 0
# of an nn.Linear weight or dim 1 of a Conv1D weight (GPT-2)
def _bert(hf: ModuleType, attn: str) -> nn.Module:
    cfg = hf.BertConfig(
        vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=32, attn_implementation=attn,
    )  # fmt: skip
    return hf.BertModel(cfg)


def _distilbert(hf: ModuleType, attn: str) -> nn.Module:
    cfg = hf.DistilBertConfig(
        vocab_size=100, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN, max_position_embeddings=32,
        attn_implementation=attn,
    )  # fmt: skip
    return hf.DistilBertModel(cfg)


def _gpt2(hf: ModuleType, attn: str) -> nn.Module:
    cfg = hf.GPT2Config(
        vocab_size=100, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN, n_positions=32,
        attn_implementation=attn,
    )  # fmt: skip
    return hf.GPT2Model(cfg)


def _vit(hf: ModuleType, attn: str) -> nn.Module:
    cfg = hf.ViTConfig(
        image_size=32, patch_size=8, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, attn_implementation=attn,
    )  # fmt: skip
    return hf.ViTModel(cfg)


def _images(batch: int, seq: int) -> tuple[torch.Tensor]:
    return (torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch)),)


MODELS = {
    "bert": (_bert, ["input_ids", "attention_mask"], _text_inputs,
             "encoder.layer.{i}.attention.self.query.weight", 0, "encoder.layer.{i}.intermediate.dense.weight", 0),
    "distilbert": (_distilbert, ["input_ids", "attention_mask"], _text_inputs,
                   "transformer.layer.{i}.attention.q_lin.weight", 0, "transformer.layer.{i}.ffn.lin1.weight", 0),
    "gpt2": (_gpt2, ["input_ids", "attention_mask"], _text_inputs,
             "h.{i}.attn.c_attn.weight", 1, "h.{i}.mlp.c_fc.weight", 1),
    "vit": (_vit, ["pixel_values"], _images,
            "encoder.layer.{i}.attention.attention.query.weight", 0, "encoder.layer.{i}.intermediate.dense.weight", 0),
}  # fmt: skip


def _group_holding(dg: idap_fx.DependencyGraph, param: str, dim: int) -> idap_fx.ChannelGroup:
    found = [g for g in dg.groups if any(m.param == param and m.dim == dim for m in g.members)]
    assert len(found) == 1, f"{param} dim {dim} is in {len(found)} groups"
    return found[0]


def _build(hf: ModuleType, name: str, attn: str):
    build, names, make_inputs, *_ = MODELS[name]
    torch.manual_seed(0)
    model = build(hf, attn).eval()
    inputs = make_inputs(2, 8)
    return model, names, inputs, trace_hf(model, names, inputs)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(MODELS))
def test_heads_and_mlp_units_are_prunable_and_prune_equals_mask(
    transformers: ModuleType, name: str, attn: str
) -> None:
    model, names, inputs, gm = _build(transformers, name, attn)
    _, _, make_inputs, head_param, head_dim, ffn_param, ffn_dim = MODELS[name]
    with torch.no_grad():
        ref = model(**dict(zip(names, inputs, strict=True)))
        assert rel_err(gm(*inputs)["last_hidden_state"], ref.last_hidden_state) <= 1e-6
    dg = idap_fx.analyze(gm)
    wanted = {}
    for i in range(LAYERS):
        heads = _group_holding(dg, head_param.format(i=i), head_dim)
        ffn = _group_holding(dg, ffn_param.format(i=i), ffn_dim)
        assert heads.prunable and heads.exact, heads.frozen_reason
        assert ffn.prunable and ffn.exact, ffn.frozen_reason
        assert heads.size == HEADS  # a unit is a whole head: its q, k and v rows go together
        assert all(len(u) == len(heads.units[0]) for u in heads.units)
        assert ffn.size == FFN
        wanted[heads.id] = wanted[ffn.id] = True
    # the residual stream reaches the (dict) output and stays whole
    assert not any(g.prunable for g in dg.groups if g.id not in wanted)

    plan = {gid: idx for gid, idx in random_plan(dg, 0.5, seed=3).items() if gid in wanted}
    assert len(plan) == 2 * LAYERS
    pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
    with torch.no_grad():
        out_p, out_m, out_0 = pruned(*inputs), masked(*inputs), gm(*inputs)
    assert rel_err(out_p, out_m) <= 1e-4
    assert rel_err(out_p, out_0) > 1e-3  # the plan really changed the model
    shapes = expected_param_shapes(gm, dg.expected_numel(plan))
    assert {k: tuple(v.shape) for k, v in pruned.state_dict().items()} == shapes
    assert shapes[head_param.format(i=0)][head_dim] in (
        HIDDEN // 2,
        3 * HIDDEN // 2,
    )  # 2 of 4 heads (GPT-2: q,k,v)
    # sizes computed in the graph still adapt: another batch size and sequence length run
    other = make_inputs(3, 5)
    with torch.no_grad():
        assert rel_err(pruned(*other), masked(*other)) <= 1e-4


def test_pruned_heads_are_written_into_the_view_arguments(transformers: ModuleType) -> None:
    _, _, inputs, gm = _build(transformers, "bert", "sdpa")
    dg = idap_fx.analyze(gm)
    heads = _group_holding(dg, "encoder.layer.0.attention.self.query.weight", 0)
    pruned = idap_fx.prune(gm, {heads.id: [0, 2, 3]}, dg)
    views = [n for n in pruned.graph.nodes if n.op == "call_method" and n.target == "view"]
    layer0 = [v for v in views if "layer_0" in v.args[0].name]
    assert layer0 and all(v.args[-2:] == (1, 8) for v in layer0)  # (batch, -1, heads, head_dim)
    layer1 = [v for v in views if "layer_1" in v.args[0].name]
    assert layer1 and all(v.args[-2:] == (4, 8) for v in layer1)
    out = pruned(*inputs)["last_hidden_state"]
    assert out.shape == (2, 8, HIDDEN)


def test_gpt2_sizes_from_sliced_shapes_are_made_explicit(transformers: ModuleType) -> None:
    """``(*x.shape[:-1], -1, d)`` and ``x.size()[:-1] + (nf,)`` become ``x.size()[k]`` items and literals."""
    _, _, _, gm = _build(transformers, "gpt2", "sdpa")
    views = [n for n in gm.graph.nodes if n.op == "call_method" and n.target in ("view", "reshape")]
    assert views
    for n in views:
        sizes = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (tuple, list)) else n.args[1:]
        for s in sizes:
            if isinstance(s, torch.fx.Node):
                assert s.target in ("size", operator.getitem), s.format_node()
                if s.target is operator.getitem:
                    assert s.args[0].target == "size" and isinstance(s.args[1], int), s.format_node()
            else:
                assert isinstance(s, int)


def test_dict_outputs_are_graph_outputs() -> None:
    """Channels that reach an output held in a dict are frozen like any other output."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 5)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            h = torch.relu(self.a(x))
            return {"hidden": h, "out": self.b(h)}

    dg = idap_fx.analyze(idap_fx.trace(Net(), torch.randn(2, 4)))
    assert not dg.group("a").prunable
    assert "graph output" in dg.group("a").frozen_reason


def test_unknown_input_name_is_a_trace_error(transformers: ModuleType) -> None:
    model = _bert(transformers, "sdpa")
    with pytest.raises(TraceError, match="no input"):
        trace_hf(model, ["input_ids", "pixels"], _text_inputs(2, 8))


def test_missing_fx_module_says_which_transformers_to_install(
    transformers: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "transformers.utils.fx", None)  # as in transformers 5
    with pytest.raises(TraceError, match=r"no transformers.utils.fx.*removed in v5.*<4.58"):
        trace_hf(_bert(transformers, "sdpa"), ["input_ids"], _text_inputs(2, 8)[:1])


def test_missing_transformers_is_a_trace_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(TraceError, match="needs Hugging Face transformers"):
        trace_hf(nn.Linear(2, 2), ["input"], [torch.randn(1, 2)])


def test_trace_hf_does_not_touch_the_model(transformers: ModuleType) -> None:
    model = _vit(transformers, "sdpa").eval()
    cls, config_cache = type(model), model.config.use_cache if hasattr(model.config, "use_cache") else None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = trace_hf(model, ["pixel_values"], _images(2, 0))
    dg = idap_fx.analyze(gm)
    idap_fx.prune(gm, random_plan(dg, 0.5), dg)
    assert type(model) is cls
    assert getattr(model.config, "use_cache", None) == config_cache
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- torchvision Swin: window attention with relative position bias ---------------------------------------------


def _small_swin(v2: bool) -> nn.Module:
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

    extra = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    torch.manual_seed(0)
    return SwinTransformer(
        patch_size=[4, 4],
        embed_dim=16,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=[4, 4],
        num_classes=10,
        **extra,
    ).eval()


def _swin_groups(dg: idap_fx.DependencyGraph, blocks: list[str]) -> tuple[dict, dict]:
    heads = {b: _group_holding(dg, f"{b}.attn.qkv.weight", 0) for b in blocks}
    mlp = {b: _group_holding(dg, f"{b}.mlp.0.weight", 0) for b in blocks}
    return heads, mlp


@pytest.mark.parametrize("v2", [False, True], ids=["swin", "swin_v2"])
def test_swin_heads_and_mlp_prune_equals_mask(v2: bool) -> None:
    model = _small_swin(v2)
    x = torch.randn(2, 3, 40, 40)  # 10x10 tokens: windows of 4 need padding, and the shifted blocks shift
    gm = idap_fx.trace(model, x)
    dg = idap_fx.analyze(gm)
    assert not dg.boundaries
    blocks = ["features.1.0", "features.1.1", "features.3.0", "features.3.1"]
    heads, mlp = _swin_groups(dg, blocks)
    for b, n_heads in zip(blocks, [2, 2, 4, 4], strict=True):
        assert heads[b].prunable and heads[b].exact, heads[b].frozen_reason
        assert heads[b].size == n_heads
        assert (
            mlp[b].prunable and mlp[b].exact and mlp[b].size == 4 * (16 if b.startswith("features.1") else 32)
        )
        # q, k, v rows, proj columns, and the head's relative position bias go with the head
        params = {m.param for m in heads[b].members}
        table = "cpb_mlp.2.weight" if v2 else "relative_position_bias_table"
        assert {f"{b}.attn.qkv.weight", f"{b}.attn.proj.weight", f"{b}.attn.{table}"} <= params

    plan = {g.id: [0] for g in heads.values()} | {g.id: list(range(0, g.size, 2)) for g in mlp.values()}
    pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
    with torch.no_grad():
        assert rel_err(pruned(x), masked(x)) <= 1e-4
        assert rel_err(pruned(x), gm(x)) > 1e-3
    shapes = expected_param_shapes(gm, dg.expected_numel(plan))
    assert {k: tuple(v.shape) for k, v in pruned.state_dict().items()} == shapes
    assert shapes["features.3.0.attn.qkv.weight"] == (3 * 3 * 8, 32)  # 3 of 4 heads of width 8
    calls = [
        n for n in pruned.graph.nodes if n.op == "call_function" and n.target.__name__ == "window_attention"
    ]
    assert sorted(n.args[5] for n in calls) == [1, 1, 3, 3]  # num_heads follows the plan


def test_pruned_swin_can_be_analysed_and_pruned_again() -> None:
    model = _small_swin(False)
    x = torch.randn(1, 3, 32, 32)
    gm = idap_fx.trace(model, x)
    dg = idap_fx.analyze(gm)
    heads, _ = _swin_groups(dg, ["features.3.0"])
    once = idap_fx.prune(gm, {heads["features.3.0"].id: [1]}, dg)
    dg2 = idap_fx.analyze(once)
    again = _group_holding(dg2, "features.3.0.attn.qkv.weight", 0)
    assert again.prunable and again.size == 3
    twice = idap_fx.prune(once, {again.id: [2]}, dg2)
    with torch.no_grad():
        assert rel_err(twice(x), idap_fx.mask(once, {again.id: [2]}, dg2)(x)) <= 1e-4


@pytest.mark.parametrize("shift", [[0, 0], [2, 2]])
@pytest.mark.parametrize("v2", [False, True])
def test_window_attention_matches_torchvision(shift: list[int], v2: bool) -> None:
    from torchvision.models.swin_transformer import shifted_window_attention

    from idap_fx.graph.ops.attention import window_attention

    g = torch.Generator().manual_seed(0)
    c, heads = 16, 4
    args = (
        torch.randn(2, 10, 9, c, generator=g),  # neither side a multiple of the window: padded
        torch.randn(3 * c, c, generator=g),
        torch.randn(c, c, generator=g),
        torch.randn(1, heads, 16, 16, generator=g),
        [4, 4],
        heads,
        shift,
    )
    kwargs = {
        "qkv_bias": torch.randn(3 * c, generator=g),
        "proj_bias": torch.randn(c, generator=g),
        "training": False,
    }
    if v2:
        kwargs["logit_scale"] = torch.rand(heads, 1, 1, generator=g)
    assert rel_err(window_attention(*args, **kwargs), shifted_window_attention(*args, **kwargs)) <= 1e-6


def test_swin_t_heads_and_mlp_prune_equals_mask() -> None:
    from torchvision.models import swin_t

    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    gm = idap_fx.trace(swin_t(weights=None).eval(), x)
    dg = idap_fx.analyze(gm)
    assert not dg.boundaries
    blocks = [f"features.{s}.{i}" for s, depth in ((1, 2), (3, 2), (5, 6), (7, 2)) for i in range(depth)]
    heads, mlp = _swin_groups(dg, blocks)
    assert [heads[b].size for b in blocks] == [3, 3, 6, 6] + [12] * 6 + [24, 24]
    assert all(g.prunable and g.exact for g in (*heads.values(), *mlp.values()))
    plan = {gid: idx for gid, idx in random_plan(dg, 0.4, seed=0).items() if dg.group(gid).exact}
    assert {g.id for g in (*heads.values(), *mlp.values())} <= set(plan)
    pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
    with torch.no_grad():
        assert rel_err(pruned(x), masked(x)) <= 1e-4
    assert sum(p.numel() for p in pruned.parameters()) < 0.75 * sum(p.numel() for p in gm.parameters())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_albert_shared_layer_heads_and_widths_prune_exactly(transformers: ModuleType, attn: str) -> None:
    """ALBERT calls ``F.scaled_dot_product_attention`` with query, key and value *by keyword* (the rule read
    positions only and declined: its heads froze) and shares one layer between all its layers: one head
    group, one MLP group, and the factorised embedding (embedding_size 16 → hidden) prunable too."""
    hf = transformers
    torch.manual_seed(0)
    cfg = hf.AlbertConfig(
        vocab_size=100, embedding_size=16, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=32, attn_implementation=attn,
    )  # fmt: skip
    names, inputs = ["input_ids", "attention_mask"], _text_inputs(2, 8)
    gm = trace_hf(hf.AlbertModel(cfg).eval(), names, inputs)
    dg = idap_fx.analyze(gm)
    layer = "encoder.albert_layer_groups.0.albert_layers.0"
    heads = _group_holding(dg, f"{layer}.attention.query.weight", 0)
    ffn = _group_holding(dg, f"{layer}.ffn.weight", 0)
    embed = _group_holding(dg, "embeddings.word_embeddings.weight", 1)
    assert not dg.boundaries
    assert [(g.prunable, g.exact, g.size) for g in (heads, ffn)] == [(True, True, HEADS), (True, True, FFN)]
    assert embed.prunable and embed.size == 16  # inexact: its LayerNorm spans the channels
    plan = {heads.id: [0, 2], ffn.id: list(range(0, FFN, 3))}
    pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
    assert pruned.state_dict()[f"{layer}.attention.query.weight"].shape == (HIDDEN // 2, HIDDEN)
    with torch.no_grad():
        for x in (inputs, _text_inputs(3, 5)):
            assert rel_err(pruned(*x), masked(*x)) <= 1e-4 and rel_err(pruned(*x), gm(*x)) > 1e-3
