"""Hugging Face transformers traced with ``idap_fx.hf.trace_hf``: heads and MLP units found and pruned exactly.

Small randomly initialised BERT, DistilBERT, GPT-2 and ViT built from their Config
classes (no download), in both the sdpa and the eager attention implementation. The
oracle: pruning a random plan over the head and MLP groups gives the same outputs as
masking it (``helpers.rel_err`` <= 1e-4), the pruned model has the expected parameter
shapes and still runs at another batch size / sequence length.
"""

from __future__ import annotations

import operator
import sys

import pytest
import torch
from helpers import expected_param_shapes, random_plan, rel_err
from torch import nn

import idap_fx
from idap_fx.errors import TraceError

transformers = pytest.importorskip("transformers")
from idap_fx.hf import trace_hf  # noqa: E402

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
def _bert(attn: str) -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=32, attn_implementation=attn,
    )  # fmt: skip
    return transformers.BertModel(cfg)


def _distilbert(attn: str) -> nn.Module:
    cfg = transformers.DistilBertConfig(
        vocab_size=100, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN, max_position_embeddings=32,
        attn_implementation=attn,
    )  # fmt: skip
    return transformers.DistilBertModel(cfg)


def _gpt2(attn: str) -> nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=100, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN, n_positions=32,
        attn_implementation=attn,
    )  # fmt: skip
    return transformers.GPT2Model(cfg)


def _vit(attn: str) -> nn.Module:
    cfg = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, attn_implementation=attn,
    )  # fmt: skip
    return transformers.ViTModel(cfg)


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


def _build(name: str, attn: str):
    build, names, make_inputs, *_ = MODELS[name]
    torch.manual_seed(0)
    model = build(attn).eval()
    inputs = make_inputs(2, 8)
    return model, names, inputs, trace_hf(model, names, inputs)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(MODELS))
def test_heads_and_mlp_units_are_prunable_and_prune_equals_mask(name: str, attn: str) -> None:
    model, names, inputs, gm = _build(name, attn)
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


def test_pruned_heads_are_written_into_the_view_arguments() -> None:
    _, _, inputs, gm = _build("bert", "sdpa")
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


def test_gpt2_sizes_from_sliced_shapes_are_made_explicit() -> None:
    """``(*x.shape[:-1], -1, d)`` and ``x.size()[:-1] + (nf,)`` become ``x.size()[k]`` items and literals."""
    _, _, _, gm = _build("gpt2", "sdpa")
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


def test_unknown_input_name_is_a_trace_error() -> None:
    model = _bert("sdpa")
    with pytest.raises(TraceError, match="no input"):
        trace_hf(model, ["input_ids", "pixels"], _text_inputs(2, 8))


def test_missing_fx_module_says_which_transformers_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers.utils.fx", None)  # as in transformers 5
    with pytest.raises(TraceError, match=r"no transformers.utils.fx.*removed in v5.*<4.58"):
        trace_hf(_bert("sdpa"), ["input_ids"], _text_inputs(2, 8)[:1])


def test_missing_transformers_is_a_trace_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(TraceError, match="needs Hugging Face transformers"):
        trace_hf(nn.Linear(2, 2), ["input"], [torch.randn(1, 2)])


def test_trace_hf_does_not_touch_the_model() -> None:
    model = _vit("sdpa").eval()
    cls, config_cache = type(model), model.config.use_cache if hasattr(model.config, "use_cache") else None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = trace_hf(model, ["pixel_values"], _images(2, 0))
    dg = idap_fx.analyze(gm)
    idap_fx.prune(gm, random_plan(dg, 0.5), dg)
    assert type(model) is cls
    assert getattr(model.config, "use_cache", None) == config_cache
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
