"""Transformers end to end: stage 2 on Hugging Face models, the residual stream opt-in, head scoring, ONNX.

Small randomly initialised BERT / GPT-2 (built from their Config classes, traced with
``idap_fx.capture.hf.trace_hf``; skipped without ``transformers``) and a small torchvision
VisionTransformer. Oracles: skipping a residual sub-block equals zeroing its branch
(exactly); pruning the residual stream slices every LayerNorm to the same kept channels;
a head whose q/k/v rows are zero scores lowest; the pruned ONNX model matches torch.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest
import torch
from helpers import rel_err, zero_branch
from torch import fx, nn
from torchvision.models import VisionTransformer

import idap_fx
from idap_fx.capture.hf import trace_hf
from idap_fx.deploy.onnx_export import export_onnx, onnx_feed
from idap_fx.method.scoring import score
from idap_fx.rewrite.skip_candidates import find_candidates, remove

HEADS, HIDDEN, FFN, LAYERS, HEAD_DIM = 4, 32, 64, 2, 8
NAMES = ["input_ids", "attention_mask"]


@pytest.fixture(scope="module")
def hf() -> ModuleType:
    """The transformers package (the ``hf`` extra); its tests skip without it."""
    return pytest.importorskip("transformers")


def _text(batch: int = 2, seq: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(batch * 100 + seq)
    ids = torch.randint(0, 100, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq - 2 :] = 0  # one padded sequence: the attention mask matters
    return ids, mask


def _bert_config(hf: ModuleType, **kw) -> object:
    return hf.BertConfig(
        vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=32, num_labels=3, **kw,
    )  # fmt: skip


def _model(hf: ModuleType, name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "bert":
        return hf.BertModel(_bert_config(hf)).eval()
    if name == "bert_cls":  # logits out: the residual stream does not reach the output
        return hf.BertForSequenceClassification(_bert_config(hf)).eval()
    cfg = hf.GPT2Config(
        vocab_size=100, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN, n_positions=32
    )
    return hf.GPT2Model(cfg).eval()


def _out(y: dict | torch.Tensor) -> torch.Tensor:
    return next(iter(y.values())) if isinstance(y, dict) else y


def _n_modules(gm: fx.GraphModule) -> int:
    return sum(n.op == "call_module" for n in gm.graph.nodes)


# --- 1. stage 2 on Hugging Face models -----------------------------------------------------------------------

# the residual sub-blocks of each layer i: (attention, MLP) candidate names
SUB_BLOCKS = {
    "bert": ("encoder.layer.{i}.attention[self..output]", "encoder.layer.{i}[intermediate..output]"),
    "gpt2": ("h.{i}[ln_1..attn]", "h.{i}[ln_2..mlp]"),
}


@pytest.mark.parametrize("name", list(SUB_BLOCKS))
def test_stage2_removes_attention_and_mlp_sub_blocks(hf: ModuleType, name: str) -> None:
    x = _text()
    gm = trace_hf(_model(hf, name), NAMES, x)
    res = idap_fx.optimize(gm, x, passes=("skip_layers",), budget=None, max_skips=2, quiet=True, strict=False)
    removed = res.report.removed_layers
    every = {s.format(i=i) for s in SUB_BLOCKS[name] for i in range(LAYERS)}
    assert len(removed) == 2
    assert all(r["kind"] == "residual" and r["accepted"] for r in removed)
    assert {r["name"] for r in removed} <= every
    assert all(r["macs_saved"] > 0 and r["params_saved"] > 0 for r in removed)
    assert _n_modules(res.model) < _n_modules(gm)
    assert sum(p.numel() for p in res.model.parameters()) < sum(p.numel() for p in gm.parameters())
    with torch.no_grad():
        got, want = _out(res.model(*x)), _out(gm(*x))
        assert got.shape == want.shape and torch.isfinite(got).all()
        assert rel_err(got, want) > 1e-4  # two sub-blocks really are gone
        other = _text(3, 5)  # sizes computed in the graph still adapt
        assert _out(res.model(*other)).shape == (3, 5, HIDDEN)


@pytest.mark.parametrize("name", list(SUB_BLOCKS))
def test_hf_residual_skip_equals_zeroed_branch(hf: ModuleType, name: str) -> None:
    x = _text()
    gm = trace_hf(_model(hf, name), NAMES, x)
    cands = find_candidates(gm, kinds=("residual",))
    assert cands
    every = {s.format(i=i) for s in SUB_BLOCKS[name] for i in range(LAYERS)}
    assert {c.name for c in cands} <= every
    for cand in cands:
        skipped = remove(gm, cand, x)
        with torch.no_grad():
            got, want = _out(skipped(*x)), _out(zero_branch(gm, cand)(*x))
        assert torch.equal(got, want), f"{cand.name}: skipping != zeroing the branch"
        assert not {n.name for n in skipped.graph.nodes} & set(cand.nodes)
        assert _n_modules(skipped) < _n_modules(gm)


@pytest.mark.parametrize(
    "name", ["bert", "gpt2"]
)  # BERT's layer 0 was not one: its mask reads the stream's dtype
def test_every_attention_and_mlp_sub_block_is_a_candidate(hf: ModuleType, name: str) -> None:
    x = _text()
    gm = trace_hf(_model(hf, name), NAMES, x)
    names = {c.name for c in find_candidates(gm, kinds=("residual",))}
    assert names == {s.format(i=i) for s in SUB_BLOCKS[name] for i in range(LAYERS)}


# --- 2. the residual stream (embedding width) opt-in ---------------------------------------------------------


def _vit() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=HIDDEN, mlp_dim=FFN, num_classes=10
    ).eval()
    return model, (torch.randn(2, 3, 32, 32),)


def _stream_case(hf: ModuleType, name: str) -> tuple[fx.GraphModule, tuple[torch.Tensor, ...], str]:
    """A traced model and the id of its residual-stream group (the embedding width)."""
    if name == "vit":
        model, x = _vit()
        return idap_fx.trace(model, x), x, "conv_proj"
    x = _text(4, 8)
    return trace_hf(_model(hf, "bert_cls"), NAMES, x), x, "bert_embeddings_word_embeddings"


def _layer_norms(gm: nn.Module) -> dict[str, nn.LayerNorm]:
    return {n: m for n, m in gm.named_modules() if isinstance(m, nn.LayerNorm)}


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_residual_stream_is_an_inexact_group_and_prunes_layernorms_consistently(
    hf: ModuleType, name: str
) -> None:
    gm, x, gid = _stream_case(hf, name)
    dg = idap_fx.analyze(gm)
    stream = dg.group(gid)
    assert stream.size == HIDDEN and stream.prunable
    assert not stream.exact and "LayerNorm" in stream.inexact_reason
    norms = _layer_norms(gm)
    assert (
        len(norms) == 2 * LAYERS + 1
    )  # every LayerNorm on the stream (ViT: the final one; BERT: embeddings)
    removed = list(range(0, HIDDEN, 4))
    kept = [c for c in range(HIDDEN) if c not in removed]
    pruned = idap_fx.prune(gm, {gid: removed}, dg)
    with torch.no_grad():
        got, want = _out(pruned(*x)), _out(gm(*x))
    assert got.shape == want.shape and torch.isfinite(got).all()
    pruned_norms = _layer_norms(pruned)
    assert pruned_norms.keys() == norms.keys()
    for n, ln in pruned_norms.items():
        assert ln.normalized_shape == (len(kept),), n
        assert torch.equal(ln.weight, norms[n].weight[kept]), n
        assert torch.equal(ln.bias, norms[n].bias[kept]), n


def _stream_width(gm: nn.Module) -> set[int]:
    return {ln.normalized_shape[0] for ln in _layer_norms(gm).values()}


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_optimize_prunes_the_stream_only_with_prune_inexact(hf: ModuleType, name: str) -> None:
    gm, x, _ = _stream_case(hf, name)
    # the group-relative allocator, so the stream competes on score alone (the default "cost" allocator
    # prefers the cheaper MLP and head units of this tiny config at 0.7 MACs and may leave the stream whole)
    on = idap_fx.optimize(
        gm, x, prune_inexact=True, target_macs=0.7, budget=None, quiet=True, strict=False, allocator="group"
    )
    assert on.report.target_reached
    assert on.report.macs_ratio <= 0.7 * 1.03
    width = _stream_width(on.model)
    assert len(width) == 1 and width.pop() < HIDDEN  # every LayerNorm keeps the same, smaller width
    off = idap_fx.optimize(gm, x, prune_inexact=False, target_macs=0.7, budget=None, quiet=True, strict=False)
    assert off.report.target_reached
    assert _stream_width(off.model) == {HIDDEN}
    embed = "bert.embeddings.word_embeddings.weight" if name == "bert" else "conv_proj.weight"
    assert off.model.state_dict()[embed].shape == gm.state_dict()[embed].shape
    with torch.no_grad():
        assert _out(on.model(*x)).shape == _out(off.model(*x)).shape == _out(gm(*x)).shape


# --- 3. head scoring ------------------------------------------------------------------------------------------

DEAD = {0: 2, 1: 1}  # layer -> the head whose q, k and v rows are zeroed


def test_a_head_with_zero_qkv_scores_lowest(hf: ModuleType) -> None:
    model = _model(hf, "bert_cls")
    rows = {i: slice(h * HEAD_DIM, (h + 1) * HEAD_DIM) for i, h in DEAD.items()}
    with torch.no_grad():
        for i, r in rows.items():
            attn = model.bert.encoder.layer[i].attention.self
            for lin in (attn.query, attn.key, attn.value):
                lin.weight[r] = 0
                lin.bias[r] = 0
    x = _text(4, 8)
    gm = trace_hf(model, NAMES, x)
    dg = idap_fx.analyze(gm)
    scores = score(gm, dg, [x, _text(3, 6)])
    for i, dead in DEAD.items():
        gid = f"bert_encoder_layer_{i}_attention_self_query"
        assert dg.group(gid).size == HEADS
        s = np.asarray(scores[gid])
        assert s.shape == (HEADS,) and np.isfinite(s).all()
        assert int(np.argmin(s)) == dead
        assert s[dead] < 0.1 * np.delete(s, dead).min()  # a head that outputs zero changes nothing


# --- 4. ONNX export with fewer heads ----------------------------------------------------------------------------


def test_pruned_bert_exports_to_onnx_with_fewer_heads(hf: ModuleType, tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    x = _text(4, 8)
    gm = trace_hf(_model(hf, "bert_cls"), NAMES, x)
    dg = idap_fx.analyze(gm)
    plan = {
        "bert_encoder_layer_0_attention_self_query": [1, 3],
        "bert_encoder_layer_1_attention_self_query": [0],
    }
    pruned = idap_fx.prune(gm, plan, dg)
    rep = export_onnx(pruned, x, tmp_path / "bert.onnx")
    assert rep.max_rel_error <= 1e-4
    proto = onnx.load(str(tmp_path / "bert.onnx"))
    shapes = [tuple(init.dims) for init in proto.graph.initializer]
    names = {init.name: tuple(init.dims) for init in proto.graph.initializer}
    for i, gid in enumerate(plan):
        w = (HEADS - len(plan[gid])) * HEAD_DIM  # layer 0 keeps 2 heads, layer 1 keeps 3
        assert names[f"bert.encoder.layer.{i}.attention.self.query.bias"] == (w,)
        assert shapes.count((HIDDEN, w)) == 3  # q, k, v weights (transposed for MatMul)
        assert shapes.count((w, HIDDEN)) == 1  # the output projection
    full = [n for n, d in names.items() if n.startswith("onnx::MatMul") and d == (HIDDEN, HIDDEN)]
    assert not full  # no attention projection kept its full width
    session = ort.InferenceSession(str(tmp_path / "bert.onnx"), providers=["CPUExecutionProvider"])
    other = _text(3, 8)  # another batch size, another padding
    (got,) = session.run(None, onnx_feed(session, other))
    with torch.no_grad():
        want = _out(pruned(*other)).numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_llama_rms_norm_stream_is_an_inexact_group_pruned_consistently(hf: ModuleType) -> None:
    """Llama's residual stream runs through RMSNorm written as pow / mean / rsqrt (traced through): it used to
    freeze ("mean over channels"); now it is one inexact group (as under LayerNorm) holding the embedding and
    every RMSNorm weight, prunable with ``prune_inexact``. Heads are exact units: one per key/value head (GQA)."""
    torch.manual_seed(0)
    cfg = hf.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    x = _text(2, 8)
    gm = trace_hf(hf.LlamaForCausalLM(cfg).eval(), NAMES, x)
    dg = idap_fx.analyze(gm)
    stream = dg.group("model_embed_tokens")
    assert stream.size == 32 and stream.prunable and not stream.exact
    assert "mean over channels" in stream.inexact_reason
    assert sorted(g.size for g in dg.prunable if g.exact) == [2, 2, 48, 48]  # 2 KV-head groups, 2 MLP widths
    removed = [1, 5, 9, 20]
    pruned = idap_fx.prune(gm, {stream.id: removed}, dg)
    norms = {k: v for k, v in pruned.state_dict().items() if k.endswith("norm.weight")}
    assert len(norms) == 2 * 2 + 1 and all(v.shape == (28,) for v in norms.values()), norms.keys()
    kept = [c for c in range(32) if c not in removed]
    assert torch.equal(norms["model.norm.weight"], gm.state_dict()["model.norm.weight"][kept])
    assert pruned.state_dict()["model.embed_tokens.weight"].shape == (100, 28)
    with torch.no_grad():
        got = _out(pruned(*x))
    assert got.shape == (2, 8, 100) and torch.isfinite(got).all()


ROTARY = {  # (config class, model class, extra config): decoders with rotary embeddings (and GQA where they have it)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 2}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 2}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"num_key_value_heads": 2, "pad_token_id": 0}),  # fused gate_up
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),  # fused query_key_value
}
# exact groups besides the two MLP widths: one head group per layer, a unit per key/value head (GPT-NeoX: per head)
HEAD_GROUPS = {"llama": [2, 2], "qwen2": [2, 2], "phi3": [2, 2], "gpt_neox": [4, 4]}


@pytest.mark.parametrize("name", sorted(ROTARY))
def test_rotary_decoders_mlp_widths_are_exact_and_the_stream_inexact(hf: ModuleType, name: str) -> None:
    """What rotary-embedding decoders get today: every MLP width prunable and exact (prune == mask, Phi-3's
    fused gate_up_proj included), heads exact (fused qkv projections too), the residual stream one inexact group
    (RMSNorm; GPT-NeoX: LayerNorm)."""
    cfg_cls, model_cls, extra = ROTARY[name]
    torch.manual_seed(0)
    cfg = getattr(hf, cfg_cls)(
        vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, **extra,
    )  # fmt: skip
    x = _text(2, 8)
    gm = trace_hf(getattr(hf, model_cls)(cfg).eval(), NAMES, x)
    dg = idap_fx.analyze(gm)
    exact = [g for g in dg.prunable if g.exact]
    inexact = [g for g in dg.prunable if not g.exact]
    assert sorted(g.size for g in exact) == [*HEAD_GROUPS[name], 48, 48], [
        (g.id, g.size) for g in dg.prunable
    ]
    assert [g.size for g in inexact] == [32] and "channels" in inexact[
        0
    ].inexact_reason  # RMSNorm, or LayerNorm
    plan = {g.id: [1, 7, 30] if g.size == 48 else [1] for g in exact}  # one head (group) of each layer
    pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
    with torch.no_grad():
        got, want, before = _out(pruned(*x)), _out(masked(*x)), _out(gm(*x))
    assert rel_err(got, want) <= 1e-4 and rel_err(got, before) > 1e-4


def test_distillation_matches_only_features_an_adapter_can_map(hf: ModuleType) -> None:
    """Head pruning leaves (b, t, heads, head_dim) views whose widths differ outside the channel dim; distillation
    (and ``auto``'s probe) must not pick them as features (MiniLM's probe crashed on one: 8 vs 12 heads)."""
    from idap_fx.method.recovery import distill, feature_nodes

    x = _text(4, 8)
    gm = trace_hf(_model(hf, "bert_cls"), NAMES, x)
    dg = idap_fx.analyze(gm)
    heads = [g for g in dg.prunable if g.exact and g.size == 4]  # the attention groups (4 heads each)
    assert heads
    pruned = idap_fx.prune(gm, {g.id: [1] for g in heads}, dg)
    teacher = {n.name: n for n in gm.graph.nodes}
    shape = lambda n: tuple(n.meta["tensor_meta"].shape)  # noqa: E731
    differ_inside = [
        n.name
        for n in pruned.graph.nodes
        if n.name in teacher and "tensor_meta" in n.meta and hasattr(n.meta["tensor_meta"], "shape")
        and len(shape(n)) == 4 and shape(n)[2] != shape(teacher[n.name])[2]
    ]  # fmt: skip
    assert differ_inside  # the case exists in this graph
    picked = feature_nodes(pruned, gm, count=10_000)  # every candidate
    assert picked and not set(picked) & set(differ_inside)
    distill(pruned, gm, [x] * 3, steps=3, lr=1e-4)  # runs (it raised a size mismatch before)
