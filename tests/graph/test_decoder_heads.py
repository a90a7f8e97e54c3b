"""Decoder attention heads under rotary embeddings, grouped-query attention and per-head q/k norms.

Hugging Face Llama-family models (transformers 4.57, tiny configs from their Config classes, traced
with ``trace_hf``): a unit of a layer's attention group is one key/value head with the query heads
it serves, RoPE's rotate-half and ``cos``/``sin`` stay inside a head, and the rotary ``inv_freq``
buffer is frozen (it spans head_dim, which never shrinks). Checked with the prune == mask oracle.
"""

from __future__ import annotations

import tempfile
from types import ModuleType

import pytest
import torch
from helpers import LastHiddenState, expected_param_shapes, random_plan, rel_err

import idap_fx

HEADS, HIDDEN, FFN, LAYERS, HEAD_DIM = 4, 32, 48, 2, 8
# family -> (config class, model class, extra config)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": HEAD_DIM}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": HEAD_DIM}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": HEAD_DIM}),  # per-head q/k RMSNorm
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": HEAD_DIM}),  # per-head q/k RMSNorm
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),  # fused qkv_proj cut by literal slices
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"rotary_pct": 0.5}),  # fused qkv chunked per head
}
# where each family keeps its attention projections (q; k, v; out), relative to the layer
PROJ = {"phi3": ("self_attn.qkv_proj", "self_attn.qkv_proj", "self_attn.o_proj"),
        "gpt_neox": ("attention.query_key_value", "attention.query_key_value", "attention.dense")}  # fmt: skip
DEFAULT_PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj")
MLP = {"phi3": "mlp.gate_up_proj", "gpt_neox": "mlp.dense_h_to_4h"}
CASES = (
    [(f, 2, "eager") for f in FAMILIES if f != "gpt_neox"]  # GPT-NeoX has no grouped-query attention
    + [(f, HEADS, "sdpa") for f in ("llama", "qwen3", "gemma2", "phi3")]
    + [("llama", 2, "sdpa"), ("gpt_neox", HEADS, "eager")]
)


@pytest.fixture(scope="module")
def hf() -> ModuleType:
    return pytest.importorskip("transformers")


def _inputs(batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(batch * 100 + seq)
    ids = torch.randint(0, 64, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, :2] = 0  # left padding in the last row
    return ids, mask


def _decoder(
    hf: ModuleType, family: str, kv_heads: int, attn: str
) -> tuple[torch.nn.Module, torch.fx.GraphModule]:
    from idap_fx.capture.hf import trace_hf

    cfg_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    kv = {} if family == "gpt_neox" else {"num_key_value_heads": kv_heads}
    cfg = getattr(hf, cfg_cls)(
        vocab_size=64, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=64, attn_implementation=attn, **kv, **extra,
    )  # fmt: skip
    model = getattr(hf, model_cls)(cfg).eval()
    return model, trace_hf(model, ["input_ids", "attention_mask"], _inputs(2, 7))


def _group_of(dg: idap_fx.DependencyGraph, param: str) -> idap_fx.ChannelGroup:
    return next(g for g in dg.groups if any(m.param == param and m.dim == 0 for m in g.members))


@pytest.mark.parametrize(("family", "kv_heads", "attn"), CASES, ids=[f"{f}-kv{k}-{a}" for f, k, a in CASES])
def test_kv_head_units_are_exact_under_rope_and_gqa(
    hf: ModuleType, family: str, kv_heads: int, attn: str
) -> None:
    model, gm = _decoder(hf, family, kv_heads, attn)
    x = _inputs(2, 7)
    with torch.no_grad():
        assert rel_err(gm(*x)["logits"], model(*x).logits) <= 1e-6
    dg = idap_fx.analyze(gm)
    q_name, k_name, o_name = PROJ.get(family, DEFAULT_PROJ)
    layer = "gpt_neox.layers.{i}" if family == "gpt_neox" else "model.layers.{i}"
    wanted = set()
    for i in range(LAYERS):
        prefix = layer.format(i=i)
        heads = _group_of(dg, f"{prefix}.{q_name}.weight")
        mlp = _group_of(dg, f"{prefix}.{MLP.get(family, 'mlp.up_proj')}.weight")
        assert heads.prunable and heads.exact, heads.frozen_reason
        assert mlp.prunable and mlp.exact, mlp.frozen_reason
        assert heads.size == kv_heads  # one unit: a KV head and its HEADS // kv_heads query heads
        params = {m.param for m in heads.members}
        assert {f"{prefix}.{n}.weight" for n in (q_name, k_name, o_name)} <= params
        wanted |= {heads.id, mlp.id}
    rope = [g for g in dg.groups if any("inv_freq" in s.node for s in g.spaces)]
    # (Gemma 3 holds a second, local rotary embedding; a layer pattern may leave one of the two unused)
    assert rope and not any(g.prunable for g in rope)
    if family not in PROJ:  # (partial rotary also reads a size off cos: frozen for that reason first)
        assert any("read within every unit" in (g.pinned_reason or "") for g in rope)

    plan = {gid: idx for gid, idx in random_plan(dg, 0.5, seed=3).items() if gid in wanted}
    assert len(plan) == 2 * LAYERS
    pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
    with torch.no_grad():
        out_p, out_m, out_0 = pruned(*x), masked(*x), gm(*x)
    assert rel_err(out_p, out_m) <= 1e-4
    assert rel_err(out_p, out_0) > 1e-3  # the plan really changed the model
    shapes = expected_param_shapes(gm, dg.expected_numel(plan))
    assert {k: tuple(v.shape) for k, v in pruned.state_dict().items()} == shapes
    prefix = layer.format(i=0)
    kept_kv = kv_heads - len(plan[_group_of(dg, f"{prefix}.{q_name}.weight").id])
    q_rows = kept_kv * (HEADS // kv_heads) * HEAD_DIM
    if q_name == k_name:  # fused: q, k and v rows of the kept heads
        assert shapes[f"{prefix}.{q_name}.weight"][0] == q_rows + 2 * kept_kv * HEAD_DIM
    else:
        assert shapes[f"{prefix}.{q_name}.weight"][0] == q_rows
        assert shapes[f"{prefix}.{k_name}.weight"][0] == kept_kv * HEAD_DIM
    other = _inputs(3, 5)  # sizes computed in the graph adapt to another batch and length
    with torch.no_grad():
        assert rel_err(pruned(*other), masked(*other)) <= 1e-4


def test_pruned_gqa_llama_exports_and_optimizes(hf: ModuleType) -> None:
    _, gm = _decoder(hf, "llama", 2, "sdpa")
    x = _inputs(2, 7)
    res = idap_fx.optimize(gm, x, target_macs=0.7, budget=None, quiet=True, strict=False)
    q = res.model.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    assert res.report.macs_ratio <= 0.7 * 1.03
    assert q.shape[1] == HIDDEN and q.shape[0] % (2 * HEAD_DIM) == 0  # whole KV groups only
    with tempfile.TemporaryDirectory() as d:
        rep = idap_fx.export_onnx(res.model, x, f"{d}/llama.onnx")
    assert rep.max_rel_error <= 1e-4


def test_clip_vision_heads_with_the_stream_width_read_off_the_input(hf: ModuleType) -> None:
    """CLIP writes ``attn.reshape(b, t, embed_dim)`` with ``embed_dim`` read off the residual stream: that one
    size is written as ``-1`` after pruning, so the heads stay prunable (they froze: "size set from another
    tensor")."""
    from idap_fx.capture.hf import trace_hf

    torch.manual_seed(0)
    cfg = hf.CLIPVisionConfig(
        hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        image_size=32, patch_size=8,
    )  # fmt: skip
    x = (torch.randn(2, 3, 32, 32),)
    gm = trace_hf(hf.CLIPVisionModel(cfg).eval(), ["pixel_values"], x)
    dg = idap_fx.analyze(gm)
    heads = [_group_of(dg, f"vision_model.encoder.layers.{i}.self_attn.q_proj.weight") for i in range(LAYERS)]
    assert all(h.prunable and h.exact and h.size == HEADS for h in heads), [h.frozen_reason for h in heads]
    plan = {h.id: [0, 2] for h in heads}
    pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
    reshapes = [n for n in pruned.graph.nodes if n.target == "reshape" and -1 in n.args[1:]]
    assert len(reshapes) == LAYERS  # the stream-width argument became -1
    with torch.no_grad():
        assert rel_err(pruned(*x), masked(*x)) <= 1e-4
        assert rel_err(pruned(*x), gm(*x)) > 1e-3
        other = (torch.randn(3, 3, 32, 32),)
        assert rel_err(pruned(*other), masked(*other)) <= 1e-4


class _FusedQKV(torch.nn.Module):
    """Bloom-style fused projection: ``view(b, t, heads, 3, head_dim)``, then ``[..., k, :]`` picks q, k, v."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = torch.nn.Linear(HIDDEN, 3 * HIDDEN), torch.nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        fused = self.qkv(x).view(b, t, HEADS, 3, HEAD_DIM)
        q, k, v = (fused[..., i, :].transpose(1, 2) for i in range(3))
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(att.transpose(1, 2).reshape(b, t, -1))


def test_integer_index_into_a_fixed_sub_dim_keeps_the_heads() -> None:
    x = torch.randn(2, 5, HIDDEN)
    gm = idap_fx.trace(_FusedQKV().eval(), x)
    dg = idap_fx.analyze(gm)
    heads = _group_of(dg, "qkv.weight")
    assert heads.prunable and heads.exact and heads.size == HEADS, heads.frozen_reason
    plan = {heads.id: [1, 2]}
    pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
    assert pruned.state_dict()["qkv.weight"].shape == (3 * HIDDEN // 2, HIDDEN)
    with torch.no_grad():
        assert rel_err(pruned(x), masked(x)) <= 1e-5 and rel_err(pruned(x), gm(x)) > 1e-3


ENCODERS = {  # name -> (config class, model class, config, input names)
    "opt": ("OPTConfig", "OPTModel", {"ffn_dim": FFN, "word_embed_proj_dim": HIDDEN}, ["input_ids", "attention_mask"]),
    "bart": ("BartConfig", "BartModel", {"d_model": HIDDEN, "encoder_layers": LAYERS, "decoder_layers": LAYERS,
             "encoder_attention_heads": HEADS, "decoder_attention_heads": HEADS, "encoder_ffn_dim": FFN,
             "decoder_ffn_dim": FFN}, ["input_ids", "attention_mask", "decoder_input_ids"]),
    "t5": ("T5Config", "T5EncoderModel", {"d_model": HIDDEN, "d_kv": HEAD_DIM, "d_ff": FFN, "num_layers": LAYERS,
           "num_heads": HEADS}, ["input_ids", "attention_mask"]),
    # interleaved partial rotary: x[..., ::2], x[..., 1::2], stack, flatten over the first rotary_dim of head_dim
    "gptj": ("GPTJConfig", "GPTJModel", {"n_embd": HIDDEN, "n_head": HEADS, "n_layer": LAYERS, "rotary_dim": 4,
             "n_positions": 64}, ["input_ids", "attention_mask"]),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_other_attention_families_prune_heads_exactly(hf: ModuleType, name: str) -> None:
    """OPT, BART (encoder, decoder and cross attention), T5's encoder and GPT-J: head groups prunable and exact.
    T5 adds layer 0's relative position bias in every layer, which ties all layers' heads into one group."""
    from idap_fx.capture.hf import trace_hf

    cfg_cls, model_cls, extra, names = ENCODERS[name]
    base = {"vocab_size": 64, "max_position_embeddings": 64}
    if name == "opt":
        base |= {"hidden_size": HIDDEN, "num_attention_heads": HEADS, "num_hidden_layers": LAYERS}
    torch.manual_seed(0)
    model = getattr(hf, model_cls)(getattr(hf, cfg_cls)(**base, **extra)).eval()
    ids, mask = _inputs(2, 7)
    x = (ids, mask, ids)[: len(names)]
    gm = trace_hf(model, names, x)
    dg = idap_fx.analyze(gm)
    heads = [g for g in dg.prunable if g.exact and g.size == HEADS]
    expected = {"opt": LAYERS, "bart": 3 * LAYERS, "t5": 1, "gptj": LAYERS}[name]
    assert len(heads) == expected, [(g.id, g.size) for g in dg.prunable]
    plan = {g.id: [1, 3] for g in heads}
    pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
    with torch.no_grad():
        assert rel_err(pruned(*x), masked(*x)) <= 1e-4
        assert rel_err(pruned(*x), gm(*x)) > 1e-3


class _BiasedAttention(torch.nn.Module):
    """Attention with a learned per-head additive bias passed to sdpa as ``attn_mask`` (BEiT-style)."""

    def __init__(self, seq: int) -> None:
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(HIDDEN, HIDDEN) for _ in range(3))
        self.out = torch.nn.Linear(HIDDEN, HIDDEN)
        self.bias = torch.nn.Parameter(torch.randn(HEADS, seq, seq))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, -1, HEAD_DIM).transpose(1, 2) for p in (self.q, self.k, self.v))
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
        return self.out(att.transpose(1, 2).reshape(b, t, -1))


def test_a_per_head_attention_mask_is_pruned_with_its_heads() -> None:
    """sdpa's ``attn_mask`` varies per head here: it must lose the same heads (it was ignored by the rule)."""
    x = torch.randn(2, 5, HIDDEN)
    gm = idap_fx.trace(_BiasedAttention(5).eval(), x)
    dg = idap_fx.analyze(gm)
    heads = _group_of(dg, "q.weight")
    assert heads.prunable and heads.exact and heads.size == HEADS
    assert "bias" in {m.param for m in heads.members}
    plan = {heads.id: [0, 3]}
    pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
    assert pruned.state_dict()["bias"].shape == (HEADS - 2, 5, 5)
    with torch.no_grad():
        assert rel_err(pruned(x), masked(x)) <= 1e-5 and rel_err(pruned(x), gm(x)) > 1e-3


MORE = {  # name -> (config class, model class, config, input names): heads and MLP widths exact per layer
    "phi": ("PhiConfig", "PhiModel", {"hidden_size": HIDDEN, "num_attention_heads": HEADS, "num_hidden_layers": LAYERS,
            "intermediate_size": FFN, "vocab_size": 64, "max_position_embeddings": 64}, ["input_ids", "attention_mask"]),
    "clip_text": ("CLIPTextConfig", "CLIPTextModel", {"hidden_size": HIDDEN, "num_attention_heads": HEADS,
                  "num_hidden_layers": LAYERS, "intermediate_size": FFN, "vocab_size": 64,
                  "max_position_embeddings": 64}, ["input_ids", "attention_mask"]),
    "clip_vision": ("CLIPVisionConfig", "CLIPVisionModel", {"hidden_size": HIDDEN, "num_attention_heads": HEADS,
                    "num_hidden_layers": LAYERS, "intermediate_size": FFN, "image_size": 32, "patch_size": 8},
                    ["pixel_values"]),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(MORE))
def test_phi_and_clip_heads_and_mlp_widths_prune_exactly(hf: ModuleType, name: str) -> None:
    """Phi (partial rotary, dense attention output), CLIP's text and vision towers (causal mask built in
    the graph, class token): per layer one exact head group and one exact MLP group; prune == mask."""
    from idap_fx.capture.hf import trace_hf

    cfg_cls, model_cls, cfg, names = MORE[name]
    torch.manual_seed(0)
    model = getattr(hf, model_cls)(getattr(hf, cfg_cls)(**cfg)).eval()
    x = (torch.randn(2, 3, 32, 32),) if names == ["pixel_values"] else _inputs(2, 7)
    gm = trace_hf(model, names, x)
    dg = idap_fx.analyze(gm)
    exact = [g for g in dg.prunable if g.exact]
    assert sorted(g.size for g in exact) == [HEADS] * LAYERS + [FFN] * LAYERS, [(g.id, g.size) for g in exact]
    plan = {g.id: [1, 3] for g in exact}
    pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
    with torch.no_grad():
        assert rel_err(pruned(*x), masked(*x)) <= 1e-4
        assert rel_err(pruned(*x), gm(*x)) > 1e-3


FALCON = {  # variant -> (config, attention implementation, exact group sizes per layer)
    "new-gqa": (
        {"new_decoder_architecture": True, "num_kv_heads": 2},
        "eager",
        [2, FFN],
    ),  # a unit: a KV head
    "new-sdpa": ({"new_decoder_architecture": True, "num_kv_heads": HEADS}, "sdpa", [HEADS, FFN]),
    "classic": ({"multi_query": False, "bias": True}, "eager", [HEADS, FFN]),
    "multi-query": ({"multi_query": True}, "eager", [HEADS, FFN]),  # the one key/value head pinned
    "alibi": (
        {"multi_query": False, "alibi": True},
        "eager",
        [HEADS, FFN],
    ),  # folded slopes, copied per layer
}


@pytest.mark.parametrize("variant", sorted(FALCON))
def test_falcon_heads_and_mlp_widths_prune_exactly(hf: ModuleType, variant: str) -> None:
    """Falcon's linears are ``x @ self.weight.T`` (no layer op: every weight was "used by no channel-aware op");
    the new decoder copies key / value heads to the query's shape with ``broadcast_to(k, q.shape)``."""
    from idap_fx.capture.hf import trace_hf

    cfg, attn, sizes = FALCON[variant]
    torch.manual_seed(0)
    config = hf.FalconConfig(
        vocab_size=64, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        ffn_hidden_size=FFN, attn_implementation=attn, **cfg,
    )  # fmt: skip
    x = _inputs(2, 7)
    gm = trace_hf(hf.FalconModel(config).eval(), ["input_ids", "attention_mask"], x)
    dg = idap_fx.analyze(gm)
    exact = [g for g in dg.prunable if g.exact]
    assert sorted(g.size for g in exact) == sorted(sizes * LAYERS), [(g.id, g.size) for g in exact]
    plan = {g.id: [1] if g.size == 2 else [1, 3] for g in exact}
    pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
    with torch.no_grad():
        assert rel_err(pruned(*x), masked(*x)) <= 1e-4
        assert rel_err(pruned(*x), gm(*x)) > 1e-3
        other = _inputs(3, 5)
        assert rel_err(pruned(*other), masked(*other)) <= 1e-4
    if variant == "multi-query":
        qkv = pruned.state_dict()["h.0.self_attention.query_key_value.weight"]
        assert qkv.shape == ((HEADS - 2 + 2) * HEAD_DIM, HIDDEN)  # two query heads gone, key and value kept
        with tempfile.TemporaryDirectory() as d:
            assert idap_fx.export_onnx(pruned, x, f"{d}/falcon.onnx").max_rel_error <= 1e-4
    if variant == "new-gqa":
        qkv = pruned.state_dict()["h.0.self_attention.query_key_value.weight"]
        assert qkv.shape == (
            (HEADS // 2 + 2) * HEAD_DIM,
            HIDDEN,
        )  # one KV head left, with its two query heads
        with tempfile.TemporaryDirectory() as d:
            assert idap_fx.export_onnx(pruned, x, f"{d}/falcon.onnx").max_rel_error <= 1e-4


def test_bloom_heads_prune_through_trace_hf(hf: ModuleType) -> None:
    """Bloom through Hugging Face's fx tracer: sizes computed as ``batch * 4`` and ``x.size(0) // 4`` with the
    head count a literal (rewritten to the kept count), ALiBi slopes from ``arange`` on the input's device
    (folded into a buffer, copied per layer). One head group per layer; prune == mask at another length, and
    at another batch the pruned model gives each row what it gives that row alone (the rewritten arithmetic
    still reads the batch); ONNX parity."""
    from idap_fx.capture.hf import trace_hf

    torch.manual_seed(0)
    model = hf.BloomForCausalLM(
        hf.BloomConfig(vocab_size=64, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS)
    )
    x = _inputs(2, 7)
    gm = trace_hf(model.eval(), ["input_ids", "attention_mask"], x)
    dg = idap_fx.analyze(gm)
    exact = [g for g in dg.prunable if g.exact]
    assert sorted(g.size for g in exact) == [HEADS] * LAYERS + [4 * HIDDEN] * LAYERS, [
        (g.id, g.size) for g in exact
    ]
    plan = {g.id: [0, 2] for g in exact}
    pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
    with torch.no_grad():
        for inputs in (x, _inputs(2, 5)):
            assert rel_err(pruned(*inputs), masked(*inputs)) <= 1e-4
        assert rel_err(pruned(*x), gm(*x)) > 1e-3
        ids, mask = _inputs(3, 5)
        rows = torch.cat([pruned(ids[i : i + 1], mask[i : i + 1])["logits"] for i in range(3)])
        assert rel_err(pruned(ids, mask)["logits"], rows) <= 1e-4
    with tempfile.TemporaryDirectory() as d:
        assert idap_fx.export_onnx(pruned, x, f"{d}/bloom.onnx").max_rel_error <= 1e-4


def test_exported_falcon_keeps_kv_heads(hf: ModuleType) -> None:
    """The same on a ``torch.export`` program: ``.T`` is ``aten.permute``, the list index an ``aten.index``
    with a constant tensor, ``broadcast_to`` an ``aten.expand`` with literal sizes, the causal mask a ``triu``."""
    from idap_fx.capture.torch_export import from_exported

    torch.manual_seed(0)
    config = hf.FalconConfig(
        vocab_size=64, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        ffn_hidden_size=FFN, new_decoder_architecture=True, num_kv_heads=2, attn_implementation="sdpa",
    )  # fmt: skip
    ids = _inputs(2, 7)[0]
    gm = from_exported(
        torch.export.export(LastHiddenState(hf.FalconModel(config).eval()), (ids,), strict=False)
    )
    dg = idap_fx.analyze(gm)
    assert not dg.boundaries
    exact = [g for g in dg.prunable if g.exact]
    assert sorted(g.size for g in exact) == [2] * LAYERS + [FFN] * LAYERS
    plan = {g.id: [1] if g.size == 2 else [1, 3] for g in exact}
    pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
    with torch.no_grad():
        assert rel_err(pruned(ids), masked(ids)) <= 1e-4 and rel_err(pruned(ids), gm(ids)) > 1e-3


def test_whisper_encoder_heads_and_mlp_widths_through_torch_export(hf: ModuleType) -> None:
    """Whisper's audio encoder (two convolutions over mel bins, sinusoidal positions, pre-LN layers). Hugging
    Face's fx tracer cannot trace it (its dummy inputs need config fields Whisper lacks); ``torch.export``
    can: per layer one exact head group and one exact MLP group, prune == mask."""
    from idap_fx.capture.torch_export import from_exported

    class Hidden(torch.nn.Module):
        def __init__(self, encoder: torch.nn.Module) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.encoder(features).last_hidden_state

    torch.manual_seed(0)
    config = hf.WhisperConfig(
        vocab_size=64, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, num_mel_bins=16,
        max_source_positions=20, max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1,
    )  # fmt: skip
    x = torch.randn(2, 16, 40)
    encoder = Hidden(hf.WhisperModel(config).get_encoder().eval())
    gm = from_exported(torch.export.export(encoder, (x,), strict=False))
    dg = idap_fx.analyze(gm)
    assert not dg.boundaries
    exact = [g for g in dg.prunable if g.exact and g.size in (HEADS, FFN)]
    assert sorted(g.size for g in exact) == [HEADS] * LAYERS + [FFN] * LAYERS, [(g.id, g.size) for g in exact]
    plan = {g.id: [1, 3] for g in exact}
    pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
    with torch.no_grad():
        assert rel_err(pruned(x), masked(x)) <= 1e-4 and rel_err(pruned(x), gm(x)) > 1e-3


@pytest.mark.parametrize("family", ["bloom", "falcon-alibi"])
def test_exported_alibi_heads_prune_per_layer(hf: ModuleType, family: str) -> None:
    """Bloom and Falcon with ALiBi on a ``torch.export`` program: the per-head slopes are computed from
    constants (``pow(base, arange(1, heads + 1))``); capture folds them into a buffer and copies the small
    bias chain per layer, so every layer has its own exact head group. prune == mask; Bloom: ONNX parity."""
    from idap_fx.capture.torch_export import from_exported

    torch.manual_seed(0)
    if family == "bloom":
        model = hf.BloomModel(hf.BloomConfig(vocab_size=64, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS))
        mlp = 4 * HIDDEN
    else:
        config = hf.FalconConfig(
            vocab_size=64, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            ffn_hidden_size=FFN, alibi=True, new_decoder_architecture=False, multi_query=False,
        )  # fmt: skip
        model, mlp = hf.FalconModel(config), FFN
    ids, mask = _inputs(2, 7)
    gm = from_exported(torch.export.export(LastHiddenState(model.eval()), (ids, mask), strict=False))
    assert any(name.startswith("_folded_") for name, _ in gm.named_buffers())
    dg = idap_fx.analyze(gm)
    exact = [g for g in dg.prunable if g.exact]
    assert sorted(g.size for g in exact) == [HEADS] * LAYERS + [mlp] * LAYERS, [(g.id, g.size) for g in exact]
    for i in range(LAYERS):  # one head group per layer, holding that layer's fused projection
        (group,) = [g for g in exact if g.size == HEADS and any(f"h_{i}_self" in m.node for m in g.members)]
        assert not any(f"h_{1 - i}_self" in m.node for m in group.members)
    plan = {g.id: [1, 3] for g in exact}
    pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
    with torch.no_grad():
        assert rel_err(pruned(ids, mask), masked(ids, mask)) <= 1e-4
        assert rel_err(pruned(ids, mask), gm(ids, mask)) > 1e-3
    if family == "bloom":  # Falcon computes its ALiBi in bfloat16, which ONNX Runtime's CPU Mul lacks
        with tempfile.TemporaryDirectory() as d:
            report = idap_fx.export_onnx(pruned, (ids, mask), f"{d}/alibi.onnx", dynamic_batch=False)
            assert report.max_rel_error <= 1e-4


QUERY_CASES = [
    ("llama", 2, "eager"),
    ("llama", 2, "sdpa"),
    ("qwen2", 2, "eager"),
    ("mistral", 1, "eager"),
    ("gemma", 1, "eager"),
]


@pytest.mark.parametrize(
    ("family", "kv_heads", "attn"), QUERY_CASES, ids=[f"{f}-kv{k}-{a}" for f, k, a in QUERY_CASES]
)
def test_query_heads_go_one_by_one_with_every_kv_head_kept(
    hf: ModuleType, family: str, kv_heads: int, attn: str
) -> None:
    """``query_heads=True``: ``repeat_kv`` (expand + reshape, which cannot skip a copy) becomes a marked
    gather; its key / value heads are pinned and every query head is a unit, so a plan may leave a key /
    value head serving no query head (kv 2: heads 0, 1 and 3 go) or one (multi-query, kv 1)."""
    from idap_fx.rewrite.repeat_kv import with_query_heads

    _, traced = _decoder(hf, family, kv_heads, attn)
    gm = with_query_heads(traced)
    assert gm is not traced and sum("index_select" in str(n.target) for n in gm.graph.nodes) == 2 * LAYERS
    assert not any("index_select" in str(n.target) for n in traced.graph.nodes)  # the input is left alone
    dg = idap_fx.analyze(gm)
    heads = [_group_of(dg, f"model.layers.{i}.self_attn.q_proj.weight") for i in range(LAYERS)]
    assert all(g.prunable and g.exact and g.size == HEADS for g in heads), [
        (g.size, g.frozen_reason) for g in heads
    ]
    kv = _group_of(dg, "model.layers.0.self_attn.k_proj.weight")
    assert not kv.prunable  # pinned (kv 1: frozen with the rotary tables as before)
    if kv_heads == 2:
        assert (
            "every channel pinned" in kv.frozen_reason and "copied to their query heads" in kv.frozen_reason
        )
    plan = {g.id: [0, 1, 3] for g in heads}
    pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
    state = pruned.state_dict()
    assert state["model.layers.0.self_attn.q_proj.weight"].shape == (HEAD_DIM, HIDDEN)
    assert state["model.layers.0.self_attn.k_proj.weight"].shape == (kv_heads * HEAD_DIM, HIDDEN)
    x, other = _inputs(2, 7), _inputs(3, 5)
    with torch.no_grad():
        assert rel_err(pruned(*x), masked(*x)) <= 1e-4 and rel_err(pruned(*x), gm(*x)) > 1e-3
        assert rel_err(pruned(*other), masked(*other)) <= 1e-4


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_exported_query_heads_prune_and_export(hf: ModuleType, kv_heads: int) -> None:
    """The same on a ``torch.export`` program (``aten.expand`` → ``aten.clone`` → ``aten.view``), with ONNX parity."""
    from idap_fx.capture.torch_export import from_exported
    from idap_fx.rewrite.repeat_kv import with_query_heads

    torch.manual_seed(0)
    cfg = hf.LlamaConfig(
        vocab_size=64, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=kv_heads, max_position_embeddings=64, attn_implementation="sdpa",
    )  # fmt: skip
    x = _inputs(2, 7)
    exported = torch.export.export(LastHiddenState(hf.LlamaModel(cfg).eval()), x, strict=False)
    gm = with_query_heads(from_exported(exported))
    dg = idap_fx.analyze(gm)
    heads = [g for g in dg.prunable if g.exact and g.size == HEADS]
    assert len(heads) == LAYERS
    plan = {g.id: [0, 2] for g in heads}
    pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
    with torch.no_grad():
        assert rel_err(pruned(*x), masked(*x)) <= 1e-4 and rel_err(pruned(*x), gm(*x)) > 1e-3
    full = (x[0], torch.ones_like(x[1]))  # padded query rows differ even unpruned (docs/transformers.md)
    with tempfile.TemporaryDirectory() as d:
        assert idap_fx.export_onnx(pruned, full, f"{d}/q.onnx", dynamic_batch=False).max_rel_error <= 1e-4


def test_optimize_with_query_heads_keeps_every_kv_head(hf: ModuleType) -> None:
    """``optimize(..., query_heads=True)``: query heads leave one by one (not in whole key / value groups),
    every key / value head stays, the target is reached, the model exports and ``at`` replays the run."""
    _, gm = _decoder(hf, "llama", 2, "sdpa")
    x = _inputs(2, 7)
    res = idap_fx.optimize(
        gm, x, target_macs=0.6, budget=None, quiet=True, strict=False, query_heads=True, keep_snapshots=True
    )
    assert res.report.macs_ratio <= 0.6 * 1.03
    state = res.model.state_dict()
    widths = [state[f"model.layers.{i}.self_attn.q_proj.weight"].shape[0] for i in range(LAYERS)]
    assert all(
        state[f"model.layers.{i}.self_attn.k_proj.weight"].shape[0] == 2 * HEAD_DIM for i in range(LAYERS)
    )
    assert any(w % (2 * HEAD_DIM) for w in widths), widths  # not whole key / value groups
    with tempfile.TemporaryDirectory() as d:
        assert idap_fx.export_onnx(res.model, x, f"{d}/llama.onnx").max_rel_error <= 1e-4
    assert not any("query_heads" in n for n in res.report.notes)
    _, mha = _decoder(hf, "llama", HEADS, "eager")  # no repeat_kv to rewrite: the report says so
    plain = idap_fx.optimize(mha, x, target_macs=0.9, budget=None, quiet=True, strict=False, query_heads=True)
    assert any("no repeat_kv" in n for n in plain.report.notes)
    from idap_fx.rewrite.repeat_kv import with_query_heads

    again = idap_fx.optimize(  # a graph already rewritten has its gathers: nothing to report
        with_query_heads(gm), x, target_macs=0.9, budget=None, quiet=True, strict=False, query_heads=True
    )
    assert not any("no repeat_kv" in n for n in again.report.notes)
    lighter = res.at(target_macs=0.8).state_dict()
    assert lighter["model.layers.0.self_attn.k_proj.weight"].shape[0] == 2 * HEAD_DIM
    assert all(
        lighter[f"model.layers.{i}.self_attn.q_proj.weight"].shape[0] >= w for i, w in enumerate(widths)
    )


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_optimize_removes_query_heads_by_default_under_multi_query_attention(
    hf: ModuleType, kv_heads: int
) -> None:
    """The default (``query_heads=None``): with one key / value head (multi-query, Gemma-2B's layout) the
    default unit would be every head of a layer, so no head could go and only MLP widths shrank; there
    query heads now go one by one and the report says so. With two key / value heads a key / value head
    still leaves with its query heads (the width stays a multiple of a key / value group), no note."""
    _, gm = _decoder(hf, "mistral", kv_heads, "eager")
    x = _inputs(2, 7)
    res = idap_fx.optimize(gm, x, target_macs=0.6, budget=None, quiet=True, strict=False, keep_snapshots=True)
    assert res.report.macs_ratio <= 0.6 * 1.03
    state = res.model.state_dict()
    q = [state[f"model.layers.{i}.self_attn.q_proj.weight"].shape[0] for i in range(LAYERS)]
    k = [state[f"model.layers.{i}.self_attn.k_proj.weight"].shape[0] for i in range(LAYERS)]
    auto = [n for n in res.report.notes if "query_heads (auto)" in n]
    if kv_heads == 1:
        assert min(q) < HEADS * HEAD_DIM and k == [HEAD_DIM] * LAYERS and auto, (q, k)
    else:
        assert all(w % (2 * HEAD_DIM) == 0 for w in q) and not auto, q
        assert [w // (HEADS // kv_heads) for w in q] == k
    with torch.no_grad():
        assert torch.isfinite(res.model(*x)["logits"]).all()
    with tempfile.TemporaryDirectory() as d:
        assert idap_fx.export_onnx(res.model, x, f"{d}/m.onnx").max_rel_error <= 1e-4
    assert res.at(target_macs=0.8).state_dict()["model.layers.0.self_attn.k_proj.weight"].shape[0] == k[0]
    off = idap_fx.optimize(gm, x, target_macs=0.9, budget=None, quiet=True, strict=False, query_heads=False)
    assert not any("query_heads" in n for n in off.report.notes)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_starcoder_multi_query_heads_go_one_by_one(hf: ModuleType, attn: str) -> None:
    """GPTBigCode (StarCoder, ``multi_query=True``): one fused projection gives the query heads and a
    head_dim-wide key and value, which ``repeat_kv`` copies to every query head. Analysed as it is, no
    head can go; with the copies as gathers (the default for one key / value head) each query head is
    a unit, the key and value stay, prune == mask."""
    from idap_fx.capture.hf import trace_hf
    from idap_fx.rewrite.repeat_kv import with_query_heads

    torch.manual_seed(0)
    cfg = hf.GPTBigCodeConfig(
        vocab_size=64, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN, multi_query=True,
        attn_implementation=attn,
    )  # fmt: skip
    x = _inputs(2, 7)
    traced = trace_hf(hf.GPTBigCodeModel(cfg).eval(), ["input_ids", "attention_mask"], x)
    assert not [g for g in idap_fx.analyze(traced).prunable if g.size == HEADS]
    gm = with_query_heads(traced, single_kv_only=True)
    dg = idap_fx.analyze(gm)
    heads = [_group_of(dg, f"h.{i}.attn.c_attn.weight") for i in range(LAYERS)]
    assert all(g.prunable and g.exact and g.size == HEADS for g in heads), [g.frozen_reason for g in heads]
    plan = {g.id: [0, 3] for g in heads}
    pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
    assert pruned.state_dict()["h.0.attn.c_attn.weight"].shape == (2 * HEAD_DIM + 2 * HEAD_DIM, HIDDEN)
    with torch.no_grad():
        assert rel_err(pruned(*x), masked(*x)) <= 1e-4 and rel_err(pruned(*x), gm(*x)) > 1e-3
