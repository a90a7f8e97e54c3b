"""ONNX Runtime latency of ResNet-50 with 3 residual blocks skipped (stage 2) vs the original.

The three blocks are the ones ``skip_layers`` removes first: the lowest layer divergence
E‖F(x)‖/(‖x‖+ε) on random calibration images, budget off (weights=None, so which blocks
carry the least flow says nothing about a trained network; the point is what removing
three blocks' nodes buys in the runtime). Both models are exported by ``export_onnx``
(parity-checked) and timed by ``idap_fx.deploy.latency.check_latency``: one run, interleaved,
one thread, median.

    .venv/bin/python bench/latency_skip.py [--size 224] [--repeats 50]
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from idap_fx.passes.base import PassContext
from idap_fx.passes.skip_layers import SkipLayers

import idap_fx
from idap_fx.deploy.latency import check_latency
from idap_fx.method.budget import Budget
from idap_fx.metrics import count_macs
from idap_fx.options import SkipOptions


def main() -> None:
    """Skip 3 blocks of ResNet-50, time both models, print the speed-up."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(1, 3, args.size, args.size)
    calib = [torch.randn(2, 3, args.size, args.size) for _ in range(2)]
    gm = idap_fx.trace(torchvision.models.resnet50(weights=None), x)
    skip = SkipLayers(
        PassContext(example_inputs=(x,), calibration=calib, budget=Budget(gm, None, calib[:1])),
        SkipOptions(max_skips=3, kinds=("residual",)),
    )
    skipped = skip(gm).graph_module
    for r in skip.record.removed:
        print(f"skipped {r['name']:<24} score {r['score']:.4f}  MACs saved {r['macs_saved'] / 1e6:.1f} M")
    macs0, macs1 = count_macs(gm, x), count_macs(skipped, x)
    print(f"MACs {macs0 / 1e9:.3f} G -> {macs1 / 1e9:.3f} G ({macs1 / macs0:.3f})")
    rep = check_latency(gm, skipped, x, threads=1, repeats=args.repeats)
    print(rep)
    print(f"speed-up: {rep.speedup:.3f}x wall, {rep.cpu_speedup:.3f}x CPU time")


if __name__ == "__main__":
    main()
