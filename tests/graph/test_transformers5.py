"""Hugging Face decoders from transformers 5 (no fx tracer: ``torch.export`` is the only capture).

These tests need transformers >= 5, which cannot share a virtual environment with the
transformers 4.57 that ``trace_hf`` uses: ``make test`` installs it into an overlay
(``.venv/hf5``, on ``PYTHONPATH``) and runs them with ``-m hf5``. Tiny configs from the
Config classes; per layer one exact head group (a key/value head with its query heads)
and one exact MLP group; prune == mask on a random plan; ONNX parity.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from helpers import random_plan, rel_err

import idap_fx
from idap_fx.capture.torch_export import from_exported

pytestmark = pytest.mark.hf5

hf = pytest.importorskip("transformers")
if int(hf.__version__.split(".")[0]) < 5:
    if os.environ.get("IDAP_REQUIRE_HF5"):
        raise RuntimeError(f"IDAP_REQUIRE_HF5 is set but transformers {hf.__version__} was imported")
    pytest.skip(
        "needs transformers >= 5 (make test runs these with the .venv/hf5 overlay)", allow_module_level=True
    )

HEADS, KV, HIDDEN, FFN, LAYERS, HEAD_DIM = 4, 2, 32, 48, 2, 8
FAMILIES = {  # family -> (config, model, extra config, kv heads)
    "llama": ("LlamaConfig", "LlamaModel", {}, KV),
    "qwen2": ("Qwen2Config", "Qwen2Model", {}, KV),
    "qwen3": ("Qwen3Config", "Qwen3Model", {"head_dim": HEAD_DIM}, KV),  # per-head q/k RMSNorm
    "mistral": ("MistralConfig", "MistralModel", {}, KV),
    "gemma": ("GemmaConfig", "GemmaModel", {"head_dim": HEAD_DIM}, KV),
    "gemma2": ("Gemma2Config", "Gemma2Model", {"head_dim": HEAD_DIM}, KV),  # soft-capping, sliding window
    "phi3": ("Phi3Config", "Phi3Model", {"pad_token_id": 0}, HEADS),  # fused qkv_proj and gate_up_proj
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXModel", {"rotary_pct": 0.5}, HEADS),  # fused qkv, partial rotary
}


class _Hidden(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).last_hidden_state


def _exported(family: str) -> tuple[torch.nn.Module, torch.fx.GraphModule, torch.Tensor]:
    cfg_cls, model_cls, extra, kv = FAMILIES[family]
    torch.manual_seed(0)
    heads = {} if family == "gpt_neox" else {"num_key_value_heads": kv}
    config = getattr(hf, cfg_cls)(
        vocab_size=64, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=64, **heads, **extra,
    )  # fmt: skip
    model = _Hidden(getattr(hf, model_cls)(config).eval())
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    return model, from_exported(torch.export.export(model, (ids,), strict=False)), ids


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_transformers5_heads_and_mlp_widths_prune_exactly(family: str) -> None:
    model, gm, ids = _exported(family)
    dg = idap_fx.analyze(gm)
    assert not dg.boundaries, dg.boundaries
    exact = [g for g in dg.prunable if g.exact]
    kv = FAMILIES[family][3]
    assert sorted(g.size for g in exact) == [kv] * LAYERS + [FFN] * LAYERS, [(g.id, g.size) for g in exact]
    plan = {gid: idx for gid, idx in random_plan(dg, 0.5, seed=3).items() if gid in {g.id for g in exact}}
    assert len(plan) == 2 * LAYERS
    pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
    with torch.no_grad():
        assert rel_err(gm(ids), model(ids)) <= 1e-6
        assert rel_err(pruned(ids), masked(ids)) <= 1e-4 and rel_err(pruned(ids), gm(ids)) > 1e-3


def test_transformers5_llama_optimizes_heads_and_exports() -> None:
    """The case the issue measured (only the MLP widths were prunable): ``optimize`` now removes whole
    key/value heads too, and the result exports to ONNX with parity."""
    _, gm, ids = _exported("llama")
    result = idap_fx.optimize(gm, ids, target_macs=0.5, budget=None, round_to=1, quiet=True)
    assert result.report.target_reached
    removed = {group for step in result.report.steps for group in step["groups"]}
    assert any("self_attn" in group for group in removed), removed  # a head group (named by its q_proj)
    with tempfile.TemporaryDirectory() as d:
        report = idap_fx.export_onnx(result.model, ids, f"{d}/llama5.onnx", dynamic_batch=False)
        assert report.max_rel_error <= 1e-4
