"""How much of a 50 % MAC cut turns into ONNX Runtime speed: ResNet-50, MobileNetV2, ViT-B/16.

For each model (torchvision, ``weights=None``, eval, one 1x3x224x224 input):

1. cut it to about 50 % of its MACs (stage 1 only):

   * ``--method uniform`` (default): every prunable dependency group keeps the same
     fraction of its units, the kept count rounded to a multiple that makes every
     tensor width a multiple of ``--round-to``; the fraction is bisected until MACs
     are ~50 %. ``--round-to`` defaults to onnxruntime's NCHWc block size on this CPU:
     16 with AVX-512, else 8 (a width of 24 on an AVX-512 machine is computed as 32);
     Units removed are the last ones (random weights: which ones does not matter for speed);
   * ``--method optimize``: ``idap_fx.optimize(model, x, target_macs=0.5, budget=None,
     round_to=8)`` (divergence scoring on random calibration batches; slower);

2. export both models with ``idap_fx.deploy.onnx_export.export_onnx`` (BN folded, parity-checked, static batch)
   and time them with ``idap_fx.deploy.latency.check_latency``: ONNX Runtime CPU, 1 intra-op thread,
   warm-up, interleaved in alternating order, one run of the script for all figures;

3. print the MACs ratio, the latencies, the speed-up and speed-up ÷ MAC-reduction
   (target >= 0.9; the IDAP++ paper's own figures correspond to about 0.67), both in wall
   clock and in CPU time (wall clock is unreliable on a busy shared machine, see
   ``idap_fx/deploy/latency.py``), and a diagnosis of each ONNX graph after onnxruntime's own
   optimisations: how many convolutions run in the NCHWc layout, BatchNorms left,
   shape-plumbing nodes (Reshape/Slice/Gather/Shape/...), and pruned widths that are not
   multiples of 8.

    .venv/bin/python bench/latency.py
    .venv/bin/python bench/latency.py --models resnet50 --repeats 40 --round-to 1
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision
from torch import fx, nn

import idap_fx
from idap_fx.deploy.latency import LatencyReport, check_latency
from idap_fx.deploy.onnx_export import export_onnx
from idap_fx.graph.dependency import ChannelGroup, DependencyGraph
from idap_fx.metrics import count_macs

MODELS = ["resnet50", "mobilenet_v2", "vit_b_16"]
TARGET_MACS = 0.5
TARGET_RATIO = 0.9
SHAPE_OPS = ("Reshape", "Slice", "Gather", "Shape", "Concat", "Unsqueeze", "Squeeze", "Expand", "Split")


def nchwc_block() -> int:
    """The channel block of onnxruntime's NCHWc convolutions here (MLAS: 16 with AVX-512F, else 8)."""
    try:
        with open("/proc/cpuinfo") as f:
            return 16 if "avx512f" in f.read().split() else 8
    except OSError:
        return 8


def build(name: str) -> nn.Module:
    """A torchvision model with random weights in eval mode (ViT's zero-initialised head randomised)."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    if name.startswith("vit"):
        nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


def unit_multiple(group: ChannelGroup, round_to: int) -> int:
    """Kept units must be a multiple of this so each of the group's tensor widths is one of ``round_to``.

    A unit is ``width`` channels in its narrowest tensor (1 for a channel, head_dim for a head).
    """
    width = max(1, min(m.count for m in group.members) // group.size)
    return round_to // math.gcd(round_to, width)


def uniform_plan(dg: DependencyGraph, keep: float, round_to: int) -> dict[str, list[int]]:
    """Remove the last units of every prunable group so it keeps ``keep`` of them (rounded up)."""
    plan = {}
    for g in dg.prunable:
        step = unit_multiple(g, round_to)
        kept = min(g.size, max(step, math.ceil(keep * g.size / step) * step))
        removed = list(range(kept, g.size))
        if removed and g.violated_part(removed) is None:
            plan[g.id] = removed
    return plan


def cut_uniform(gm: fx.GraphModule, x: torch.Tensor, round_to: int) -> tuple[fx.GraphModule, float]:
    """The uniformly pruned model whose MACs are closest to ``TARGET_MACS`` of the original, and its keep fraction."""
    dg = idap_fx.analyze(gm)
    base = count_macs(gm, x)
    lo, hi, best = 0.05, 1.0, None
    for _ in range(12):
        keep = (lo + hi) / 2
        small = idap_fx.prune(gm, uniform_plan(dg, keep, round_to), dg)
        ratio = count_macs(small, x) / base
        if best is None or abs(ratio - TARGET_MACS) < abs(best[2] - TARGET_MACS):
            best = (small, keep, ratio)
        if abs(ratio - TARGET_MACS) < 0.01:
            break
        lo, hi = (keep, hi) if ratio < TARGET_MACS else (lo, keep)
    return best[0], best[1]


def cut_optimize(model: nn.Module, x: torch.Tensor, round_to: int) -> fx.GraphModule:
    """``idap_fx.optimize`` to 50 % MACs, no budget (pure target-driven), stage 1 only."""
    result = idap_fx.optimize(
        model,
        x,
        target_macs=TARGET_MACS,
        budget=None,
        round_to=round_to,
        passes=["prune_channels"],
        quiet=True,
    )
    return result.model


@dataclass
class GraphStats:
    """What onnxruntime runs after its own graph optimisations."""

    convs: int
    nchwc_convs: int
    batchnorms: int
    shape_ops: int
    nodes: int


def graph_stats(path: str, directory: str) -> GraphStats:
    """Op counts of the graph onnxruntime (ORT_ENABLE_ALL, 1 thread) actually executes."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = os.path.join(directory, os.path.basename(path) + ".ort.onnx")
    options.log_severity_level = 3  # the "hardware specific" warning about saving NCHWc graphs
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    nodes = onnx.load(options.optimized_model_filepath).graph.node
    kinds = collections.Counter((n.domain, n.op_type) for n in nodes)
    convs = sum(c for (d, op), c in kinds.items() if op in ("Conv", "FusedConv"))
    return GraphStats(
        convs=convs,
        nchwc_convs=kinds[("com.microsoft.nchwc", "Conv")],
        batchnorms=sum(c for (_, op), c in kinds.items() if op == "BatchNormalization"),
        shape_ops=sum(c for (_, op), c in kinds.items() if op in SHAPE_OPS),
        nodes=len(nodes),
    )


def describe(stats: GraphStats, gm: nn.Module) -> str:
    """One line: the ORT graph's layout and clutter, and conv/linear output widths off 8 / 16."""
    widths = [
        m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        for m in gm.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    off8, off16 = (sum(w % k != 0 for w in widths) for k in (8, 16))
    return (
        f"{stats.nchwc_convs}/{stats.convs} convs NCHWc, {stats.batchnorms} BN, "
        f"{stats.shape_ops} shape ops of {stats.nodes} nodes; of {len(widths)} layer widths "
        f"{off8} not %8, {off16} not %16"
    )


def run(name: str, method: str, round_to: int, warmup: int, repeats: int) -> dict[str, object]:
    model = build(name)
    x = torch.randn(1, 3, 224, 224)
    gm = idap_fx.trace(model, x)
    start = time.perf_counter()
    note = ""
    if method == "uniform":
        small, keep = cut_uniform(gm, x, round_to)
        note = f"keep {keep:.3f} of every group"
    else:
        small = cut_optimize(model, x, round_to)
    cut_s = time.perf_counter() - start
    macs = (count_macs(gm, x), count_macs(small, x))
    with tempfile.TemporaryDirectory(prefix="idap_bench_latency_") as tmp:
        paths = [os.path.join(tmp, f"{name}_{tag}.onnx") for tag in ("original", "optimized")]
        parity = [
            export_onnx(m, x, p, dynamic_batch=False).max_rel_error
            for m, p in zip((gm, small), paths, strict=True)
        ]
        rep: LatencyReport = check_latency(*paths, x, threads=1, warmup=warmup, repeats=repeats, macs=macs)
        stats = [graph_stats(p, tmp) for p in paths]
    return {
        "model": name,
        "rep": rep,
        "macs": macs,
        "cut_s": cut_s,
        "parity": max(parity),
        "note": note,
        "diag": [describe(s, m) for s, m in zip(stats, (gm, small), strict=True)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--method", choices=["uniform", "optimize"], default="uniform")
    parser.add_argument(
        "--round-to",
        type=int,
        default=nchwc_block(),
        help="kept widths are multiples of this (default: NCHWc block)",
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per model (interleaved)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (pruning, export)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(
        f"method {args.method}, round_to {args.round_to}, 1x3x224x224, ONNX Runtime {ort.__version__} CPU, "
        f"1 intra-op thread, {args.warmup} warm-up + {args.repeats} interleaved runs each, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n"
    )
    print(
        "| model | MACs (G) orig → opt | MACs ratio | latency ms orig → opt (wall) | speed-up wall | "
        "÷ MAC-red. wall | CPU ms orig → opt | speed-up CPU | ÷ MAC-red. CPU | busy |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name in args.models:
        r = run(name, args.method, args.round_to, args.warmup, args.repeats)
        rep, (m0, m1) = r["rep"], r["macs"]
        rows.append(r)
        print(
            f"| {name} | {m0 / 1e9:.2f} → {m1 / 1e9:.2f} | {m1 / m0:.3f} | "
            f"{rep.original_median_ms:.1f} → {rep.optimized_median_ms:.1f} | {rep.speedup:.2f}x | "
            f"{rep.speedup_per_macs_ratio:.2f} | {rep.original_cpu_ms:.1f} → {rep.optimized_cpu_ms:.1f} | "
            f"{rep.cpu_speedup:.2f}x | {rep.cpu_speedup_per_macs_ratio:.2f} | {'yes' if rep.contended else 'no'} |",
            flush=True,
        )
    print("\nDiagnosis (graph onnxruntime executes after its optimisations; parity of both exports):\n")
    for r in rows:
        print(f"- {r['model']}: cut in {r['cut_s']:.1f} s {r['note']}; parity max rel err {r['parity']:.1e}")
        print(f"  - original:  {r['diag'][0]}")
        print(f"  - optimized: {r['diag'][1]}")
    ratios = [r["rep"].cpu_speedup_per_macs_ratio for r in rows]
    print(
        f"\nspeed-up ÷ MAC-reduction (CPU time) geometric mean {float(np.exp(np.mean(np.log(ratios)))):.2f}, "
        f"target >= {TARGET_RATIO}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
