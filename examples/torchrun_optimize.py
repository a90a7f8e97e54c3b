"""Prune a ResNet-18 with idap_fx on one process or many, with the same script.

    python examples/torchrun_optimize.py --out out/torchrun
    torchrun --nproc-per-node 2 examples/torchrun_optimize.py --out out/torchrun

Under torchrun every rank scores on its own shard of the calibration data (idap_fx
all-reduces the statistics, so all ranks take the same pruning decisions), distils on its
shard of the training set (DistributedDataParallel + DistributedSampler, set up by
idap_fx), and returns the same model; rank 0 alone writes the ONNX file and the report.
A rank that fails stops the others at once (``fail_fast``) and nothing is written.
Synthetic images stand in for your data; the ResNet is built with ``weights=None``.
"""

from __future__ import annotations

import argparse
import datetime
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torchvision
from torch.utils.data import DataLoader, TensorDataset

import idap_fx
from idap_fx.distributed import fail_fast, is_main, main_output, rank, world_size


def main() -> None:
    """Parse arguments, join the process group if torchrun started us, optimize, write on rank 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/torchrun"))
    parser.add_argument("--target-macs", type=float, default=0.6)
    parser.add_argument("--size", type=int, default=64, help="image side (small: a quick demo)")
    args = parser.parse_args()

    if "RANK" in os.environ and not dist.is_initialized():  # set by torchrun
        # gloo: the model runs on the CPU here; with one GPU per rank use "nccl" and
        # torch.cuda.set_device(int(os.environ["LOCAL_RANK"])).
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    try:
        with fail_fast():
            run(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args: argparse.Namespace) -> None:
    """Every rank: same seeded model, its own shard of the data, the same result."""
    torch.manual_seed(0)  # every rank must start from the same weights
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, args.size, args.size)

    g = torch.Generator().manual_seed(1)  # the whole data set, identical on every rank ...
    images = torch.randn(64, 3, args.size, args.size, generator=g)
    calib = list(images[:32].split(4))  # 8 batches
    per_rank = len(calib) // world_size()  # ... and this rank's contiguous share of the calibration
    shard = calib[rank() * per_rank : (rank() + 1) * per_rank]
    train = DataLoader(TensorDataset(images[32:]), batch_size=4)  # idap_fx shards it per rank

    result = idap_fx.optimize(
        model,
        x,
        calibration=shard,
        target_macs=args.target_macs,
        budget=None,
        train_loader=train,
        distill_steps=2,
        quiet=not is_main(),
    )
    print(f"rank {rank()}/{world_size()}: MACs {result.report.macs_ratio:.3f} of the original")

    if is_main():
        args.out.mkdir(parents=True, exist_ok=True)
    with main_output(args.out / "resnet18_pruned.onnx") as tmp:
        if tmp is not None:
            result.export_onnx(tmp)
    with main_output(args.out / "report.md") as tmp:
        if tmp is not None:
            Path(tmp).write_text(result.report.to_markdown())
    if is_main():
        print(f"wrote {args.out / 'resnet18_pruned.onnx'} and {args.out / 'report.md'}")


if __name__ == "__main__":
    main()
