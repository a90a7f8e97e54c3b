"""Property-based stress: generated architectures, random plans, random stage-1 runs, ONNX parity.

The architectures come from ``test_random_arch``'s generator (residual adds, concat,
split/chunk, grouped and depthwise convs, BatchNorm, SE gates, layer scales, flatten /
view -> linear heads, ops without a rule as a wrapped function or an opaque leaf), kept
to at most three blocks of 2-6 channels on 8x8 inputs so that an example costs
milliseconds. Example counts are set per test (not by the profile): 1,000 architectures
through the prune == mask oracle and 300 more through random ``optimize`` runs (stage 1,
stage 2 or both; every allocator, ``auto`` most often), which
may raise only documented ``IdapError`` subclasses and must keep their promises (budget,
target, shapes, finite weights, caller's model untouched) when they succeed. About 2 %
of the examples of each also go through ONNX export and onnxruntime parity. Measured
here: about 70 s of CPU for the file (``-m slow`` adds 5,000 oracle examples).
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import pytest
import torch
from helpers import out_shapes, plan_is_exact, random_plan, rel_err, state_hash
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from test_random_arch import Net, _Opaque, _randomize_batchnorm, block_spec
from torch import fx

import idap_fx
from idap_fx.deploy.onnx_export import export_onnx
from idap_fx.method.allocate import ALLOCATORS
from idap_fx.method.schedule import IdapSchedule
from idap_fx.rewrite.surgery import masked_call

tiny_arch = st.fixed_dictionaries(
    {
        "stem": st.integers(2, 6),
        "blocks": st.lists(block_spec, min_size=1, max_size=3),
        "head": st.sampled_from(["pool", "mean", "flatten", "view"]),
        "classes": st.integers(2, 5),
    }
)
STRESS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _build(spec: dict, seed: int) -> tuple[fx.GraphModule, torch.Tensor]:
    torch.manual_seed(seed)
    model = Net(spec).eval()
    _randomize_batchnorm(model)
    x = torch.randn(2, 3, 8, 8)
    return idap_fx.trace(model, x, leaf_modules=[_Opaque]), x


def _sampled(spec: dict, seed: int, every: int = 50) -> bool:
    """About one example in ``every``, chosen by a hash (hypothesis's own draws are far from uniform)."""
    return zlib.crc32(repr((spec, seed)).encode()) % every == 0


@settings(STRESS, max_examples=1000)
@given(
    spec=tiny_arch,
    ratio=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**16),
)
def test_generated_architectures_prune_matches_mask(spec: dict, ratio: float, seed: int, tmp_path_factory):
    gm, x = _build(spec, seed)
    before = state_hash(gm)
    dg = idap_fx.analyze(gm)
    plan = random_plan(dg, ratio, seed)
    note(f"plan: {plan}")
    assert plan_is_exact(dg, plan)
    pruned, masked = idap_fx.prune(gm, plan, dg), idap_fx.mask(gm, plan, dg)
    with torch.no_grad():
        y, y_pruned, y_masked = gm(x), pruned(x), masked(x)
        y_call = masked_call(gm, plan, dg)(x)  # the copy-free mask the sensitivity allocator uses
    assert out_shapes(y_pruned) == out_shapes(y)
    assert rel_err(y_pruned, y_masked) <= 1e-5
    assert rel_err(y_call, y_masked) == 0.0
    if plan:
        assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in gm.parameters())
    assert state_hash(gm) == before  # prune, mask and masked_call work on copies
    if _sampled(spec, seed):  # export the pruned model: onnxruntime must agree with torch
        event("ONNX parity checked")
        report = export_onnx(pruned, x, tmp_path_factory.mktemp("onnx") / "pruned.onnx", slim=False)
        assert report.max_rel_error <= 1e-4


schedules = st.one_of(
    st.sampled_from(["idap", "cubic"]),
    st.builds(IdapSchedule, rho0=st.floats(0.05, 0.6), steps=st.integers(1, 6)),
)
targets = st.floats(0.05, 0.95)
budgets = st.just(0.0) | st.floats(1e-4, 0.5)
aims = st.one_of(  # at least one of them: neither is refused up front (tests/api/test_optimize_input.py)
    st.fixed_dictionaries({"target_macs": targets, "budget": st.none()}),
    st.fixed_dictionaries({"target_macs": st.none(), "budget": budgets}),
    st.fixed_dictionaries({"target_macs": targets, "budget": budgets}),
)
stage1_options = st.tuples(
    aims,
    st.fixed_dictionaries(
        {
            "passes": st.sampled_from(
                [["prune_channels"], ["prune_channels", "skip_layers"], ["skip_layers"]]
            ),
            "max_skips": st.integers(1, 3),
            "importance": st.sampled_from(["divergence", "l1", "bn_scale", "random"]),
            "allocator": st.sampled_from(["auto", *ALLOCATORS]),  # the default (auto) twice as often
            "schedule": schedules,
            "min_channels": st.integers(1, 2),
            "round_to": st.sampled_from([1, 2]),
            "compensation": st.booleans(),
        }
    ),
).map(lambda parts: parts[0] | parts[1])


@settings(STRESS, max_examples=300)
@given(
    spec=tiny_arch,
    options=stage1_options,
    n_batches=st.integers(1, 4),
    batch=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_random_optimize_runs_fail_only_with_documented_errors(
    spec: dict, options: dict[str, Any], n_batches: int, batch: int, seed: int, tmp_path_factory
):
    gm, x = _build(spec, seed)
    before = state_hash(gm)
    g = torch.Generator().manual_seed(seed)
    calibration = [torch.randn(batch, 3, 8, 8, generator=g) for _ in range(n_batches)]
    try:
        res = idap_fx.optimize(gm, x, calibration=calibration, strict=False, quiet=True, seed=seed, **options)
    except idap_fx.IdapError as exc:
        event(f"optimize raised {type(exc).__name__}")
        note(f"{type(exc).__name__}: {exc}")
        return
    finally:
        assert state_hash(gm) == before  # the caller's model is never touched, error or not
    for stop in res.report.stop_reason.split("; "):
        event(f"stop: {stop.split(' (')[0]}")
    rep = res.report
    assert rep.macs_after <= rep.macs_before and rep.params_after <= rep.params_before
    if options["budget"] is not None:
        assert rep.budget_consumed <= options["budget"] + 1e-12
    if rep.target_reached:
        assert rep.macs_ratio <= options["target_macs"] * 1.03
    probe = torch.randn(3, 3, 8, 8, generator=g)
    with torch.no_grad():
        y, y_opt = gm(probe), res.model(probe)
    assert out_shapes(y_opt) == out_shapes(y)
    assert all(math.isfinite(v) for v in y_opt.flatten().tolist())
    assert all(torch.isfinite(p).all() for p in res.model.parameters())
    if _sampled(spec, seed):  # the optimized model exports with onnxruntime parity
        event("ONNX parity checked")
        report = res.export_onnx(tmp_path_factory.mktemp("onnx") / "optimized.onnx", slim=False)
        assert report.max_rel_error <= 1e-4


@pytest.mark.slow
@settings(STRESS, max_examples=5000)
@given(spec=tiny_arch, ratio=st.floats(0.05, 0.95), seed=st.integers(0, 2**16))
def test_generated_architectures_long_run(spec: dict, ratio: float, seed: int):
    """The oracle on 5,000 more architectures (``-m slow``)."""
    gm, x = _build(spec, seed)
    dg = idap_fx.analyze(gm)
    plan = random_plan(dg, ratio, seed)
    with torch.no_grad():
        assert rel_err(idap_fx.prune(gm, plan, dg)(x), idap_fx.mask(gm, plan, dg)(x)) <= 1e-5
