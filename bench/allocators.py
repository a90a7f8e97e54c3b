"""Which allocator and which floor: every allocator × ``min_keep`` on two small CNNs trained on digits.

Models: ``DigitsNet`` (bench/quality.py: residual, 8×8 and 4×4 stages) and ``DigitsMobile``
(defined here: depthwise inverted residuals, a concatenation and an SE gate — the topology
of issue 12's collapse). Each is pruned by ``idap_fx.optimize`` (divergence scores, budget
off, default round_to) to 70 / 50 / 30 % of its MACs, then fine-tuned by one identical loop
(``_data.fine_tune``: ``--ft-steps`` AdamW steps, CE + KL to the unpruned model, frozen BN).
Reported: test accuracy one-shot and after the fine-tune, the narrowest group's kept fraction
of its original width, and Torch-Pruning's global L2 magnitude pruner at the same MACs as a
reference. Writes ``bench/results/allocators.json`` and ``.md``.

    .venv/bin/python bench/allocators.py        # about 15 min on one shared core
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
import torch.nn.functional as F
from _data import (
    RESULTS,
    BatchStream,
    accuracy,
    cache_path,
    digits_splits,
    fine_tune,
    seed_all,
    single_thread,
    tp_prune_to_macs,
    train_classifier,
)
from quality import train_model
from torch import nn

import idap_fx
from idap_fx.metrics import count_macs


class DigitsMobile(nn.Module):
    """Inverted residuals (depthwise 3×3), a concatenation of two branches and an SE gate, for 8×8 digits."""

    def __init__(self, w: int = 32) -> None:
        super().__init__()

        def cbr(cin: int, cout: int, k: int = 1, groups: int = 1, stride: int = 1) -> nn.Sequential:
            pad = k // 2
            conv = nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False)
            return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU6())

        self.stem = cbr(1, w, 3)
        self.ir1 = nn.Sequential(
            cbr(w, 4 * w), cbr(4 * w, 4 * w, 3, 4 * w), nn.Conv2d(4 * w, w, 1, bias=False)
        )
        self.ir1_bn = nn.BatchNorm2d(w)
        self.down = nn.Sequential(cbr(w, 4 * w), cbr(4 * w, 4 * w, 3, 4 * w, 2), cbr(4 * w, 2 * w))
        self.branch_a = cbr(2 * w, w, 3)
        self.branch_b = cbr(2 * w, w // 2, 1)
        self.se = nn.Sequential(nn.Linear(3 * w // 2, w // 4), nn.ReLU(), nn.Linear(w // 4, 3 * w // 2))
        self.last = cbr(3 * w // 2, 2 * w)
        self.head = nn.Linear(2 * w, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.ir1_bn(self.ir1(x))
        x = self.down(x)
        x = torch.cat([self.branch_a(x), self.branch_b(x)], 1)
        gate = torch.sigmoid(self.se(x.mean((2, 3))))
        x = self.last(x * gate[:, :, None, None])
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def train_mobile(seed: int, data: dict[str, Any], epochs: int = 40) -> nn.Module:
    """Train (or load from the cache) DigitsMobile: AdamW + one-cycle, the best validation epoch."""
    path = cache_path("digits-mobile", {"seed": seed, "epochs": epochs, "arch": "DigitsMobile-v1"})
    seed_all(seed)
    model = DigitsMobile()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    train_classifier(
        model, *data["train"], lambda m: accuracy(m, *data["val"]), seed=seed, lr=3e-3, weight_decay=5e-4,
        batch=64, epochs=epochs,
    )  # fmt: skip
    torch.save(model.state_dict(), path)
    return model.eval()


def narrowest(original: nn.Module, pruned: nn.Module) -> tuple[float, str]:
    """The smallest kept fraction of output channels over the conv / linear layers, and its layer."""
    widths = {}
    for name, m in original.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            widths[name] = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
    best = (1.0, "")
    for name, m in pruned.named_modules():
        if name in widths:
            out = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            best = min(best, (out / widths[name], name))
    return best


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    data = digits_splits(0)
    x_tr, y_tr = data["train"]
    x_te, y_te = data["test"]
    example = x_tr[:1]
    gen = torch.Generator().manual_seed(1000)
    calib = list(x_tr[torch.randperm(len(x_tr), generator=gen)[:512]].split(64))
    trainers = {"DigitsNet": lambda: train_model(0, data)[0], "DigitsMobile": lambda: train_mobile(0, data)}
    models = {name: trainers[name]() for name in args.models}
    rows = []
    for mname, model in models.items():
        macs0 = count_macs(model, (example,))
        base = accuracy(model, x_te, y_te)
        rows.append(
            {"model": mname, "method": "unpruned", "target": 1.0, "macs": 1.0, "none": base, "ft": base}
        )
        for target in args.targets:
            for alloc in args.allocators:
                for keep in args.min_keep:
                    t0 = time.perf_counter()
                    res = idap_fx.optimize(
                        model, example, calibration=calib, target_macs=target, budget=None, quiet=True,
                        allocator=alloc, min_keep=keep, strict=False,
                    )  # fmt: skip
                    row = {"model": mname, "method": f"{alloc}/{keep}", "target": target}
                    rows.append(_measure(row, res.model, model, macs0, example, data, args, t0))
            tp, _, _ = tp_prune_to_macs(model, example, round(target * macs0), lambda m: [m.head], True)
            row = {"model": mname, "method": "TP global L2", "target": target}
            rows.append(_measure(row, tp, model, macs0, example, data, args, time.perf_counter()))
    return rows


def _measure(row: dict[str, Any], pruned: nn.Module, model: nn.Module, macs0: int, example: torch.Tensor,
             data: dict[str, Any], args: argparse.Namespace, t0: float) -> dict[str, Any]:  # fmt: skip
    x_te, y_te = data["test"]
    frac, layer = narrowest(model, pruned)
    row |= {"macs": count_macs(pruned, (example,)) / macs0, "none": accuracy(pruned, x_te, y_te)}
    row |= {"narrowest": frac, "narrowest_layer": layer, "time": time.perf_counter() - t0}
    seed_all(0)
    tuned = fine_tune(pruned, model, iter(BatchStream(*data["train"], 64, seed=7)), args.ft_steps)
    row["ft"] = accuracy(tuned, x_te, y_te)
    print(json.dumps(row), flush=True)
    return row


def render(rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Allocators and floors (bench/allocators.py)",
        "",
        "Test accuracy (%) one-shot / after the identical fine-tune; `min` = narrowest layer's kept fraction.",
        "",
        "| model | method | target | MACs | one-shot | +FT | min |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['target']:.1f} | {r['macs']:.3f} | {r['none']:.1f} | "
            f"{r['ft']:.1f} | {r.get('narrowest', 1.0):.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.5, 0.3])
    p.add_argument("--allocators", nargs="+", default=["global", "group", "cost", "sensitivity"])
    p.add_argument("--min-keep", type=float, nargs="+", default=[0.0, 0.1, 0.25])
    p.add_argument("--models", nargs="+", default=["DigitsNet", "DigitsMobile"])
    p.add_argument("--ft-steps", type=int, default=100)
    p.add_argument("--out", default=str(RESULTS / "allocators"))
    args = p.parse_args()
    single_thread(0)
    rows = run(args)
    with open(args.out + ".json", "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(render(rows))


if __name__ == "__main__":
    main()
