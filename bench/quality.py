"""Quality benchmark on real data: a CNN trained here on scikit-learn's handwritten digits, pruned several ways.

At 70 % and 50 % of the MACs it compares idap_fx's ``divergence``, ``l1`` and ``random``
importance with Torch-Pruning 1.6.1's ``MagnitudePruner`` at the same MACs (its ratio is
bisected toward the MACs of idap_fx's divergence result), every model's MACs counted by
the same counter (``torch.utils.flop_counter``):

* **no training** — idap_fx with bias compensation (its iterative schedule, re-scored
  every step, calibration images only, no labels; the ``no comp.`` column switches the
  compensation off) vs Torch-Pruning one-shot;
* **+ BN recal.** — the models of the first column with their BatchNorm statistics
  re-estimated on the calibration images (``_data.recalibrate_bn``; no labels, no
  gradients): a diagnostic applied to every method alike, not something idap_fx does;
* **+FT** — the pruned models of the first column fine-tuned by one identical loop
  (``_data.fine_tune``: AdamW lr 1e-4, CE + KL to the unpruned model, BN frozen) for
  ``--ft-steps`` steps, so only the choice of channels differs;
* **+distil** — idap_fx's own recovery (``optimize(train_loader=…)``: distillation from
  the previous step after every pruning step), capped at the same number of steps.

Torch-Pruning runs twice: its default (the same ratio in every layer; its MACs move in
coarse steps, so the closest match is used and its MACs are shown) and with
``global_pruning=True`` (matched within 1 %). ``divergence/group-mean`` is a diagnostic,
not an idap_fx criterion: idap_fx's divergence divided by its group's mean before the
global ranking (what Torch-Pruning's normaliser does), to test whether the cross-layer
scale of the raw scores is what hurts.

Test accuracy (%) is the mean over ``--seeds`` (each seed trains its own network and
seeds the random criterion). Writes ``bench/results/quality.md``, ``quality.png`` and the
raw rows as ``quality.json`` (``--from-json`` re-renders the table and plot from them).

    .venv/bin/python bench/quality.py            # 5 seeds, about 4.5 min on one idle core
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from _data import (
    RESULTS,
    BatchStream,
    GroupMeanDivergence,
    accuracy,
    cache_path,
    digits_splits,
    fine_tune,
    recalibrate_bn,
    seed_all,
    single_thread,
    tp_prune_to_macs,
    train_classifier,
)
from _results import table
from render_docs import markdown_table
from torch import nn

import idap_fx
from idap_fx.metrics import count_macs

TRAIN = {"epochs": 60, "batch": 64, "lr": 2e-3, "weight_decay": 5e-4, "width": 64, "split_seed": 0}


class DigitsNet(nn.Module):
    """A small residual CNN for 8×8 digits: 8×8 stage, 4×4 residual stage, global pool, linear head."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()

        def cbr(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
            )

        self.stem = cbr(1, width // 2)
        self.stage1 = nn.Sequential(cbr(width // 2, width), cbr(width, width), nn.MaxPool2d(2))
        self.res = nn.Sequential(cbr(width, width), nn.Conv2d(width, width, 3, padding=1, bias=False))
        self.res_bn = nn.BatchNorm2d(width)
        self.stage2 = cbr(width, 2 * width)
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage1(self.stem(x))
        x = F.relu(x + self.res_bn(self.res(x)))
        x = self.stage2(x)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to one pixel (zero padded): light augmentation for training."""
    pad = F.pad(x, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2,), generator=gen).tolist()
    return pad[:, :, dy : dy + x.shape[2], dx : dx + x.shape[3]]


def train_model(
    seed: int, data: dict[str, Any], net: type[nn.Module] | None = None, arch: str = "DigitsNet-v1"
) -> tuple[nn.Module, dict[str, float]]:
    """Train (or load from the cache) the seed's ``net`` (default DigitsNet); keep the best validation epoch."""
    config = {**TRAIN, "seed": seed, "arch": arch}
    path = cache_path("digits", config)
    seed_all(seed)
    model = (net or DigitsNet)(TRAIN["width"])
    if path.exists():
        blob = torch.load(path, weights_only=True)
        model.load_state_dict(blob["state"])
        return model.eval(), blob["info"]
    x, y = data["train"]
    best, best_epoch = train_classifier(
        model, x, y, lambda m: accuracy(m, *data["val"]), seed=seed, lr=TRAIN["lr"],
        weight_decay=TRAIN["weight_decay"], batch=TRAIN["batch"], epochs=TRAIN["epochs"], augment=_shift,
    )  # fmt: skip
    info = {"val": best, "epoch": best_epoch, "train": accuracy(model, *data["train"])}
    torch.save({"state": model.state_dict(), "info": info}, path)
    return model.eval(), info


def _ignored(m: nn.Module) -> list[nn.Module]:
    return [m.head]  # the classifier's outputs are the model's outputs (idap_fx freezes them too)


IDAP_METHODS: dict[str, Any] = {
    "divergence": "divergence",
    "l1": "l1",
    "random": "random",
    "divergence/group-mean": GroupMeanDivergence(),
}
TP_METHODS = {"torch-pruning": False, "torch-pruning global": True}
METHODS = (*IDAP_METHODS, *TP_METHODS)


def run_seed(seed: int, args: argparse.Namespace, data: dict[str, Any]) -> list[dict[str, Any]]:
    """Every method at every target for one trained network; one row per (method, target)."""
    model, info = train_model(seed, data)
    x_te, y_te = data["test"]
    x_tr, y_tr = data["train"]
    example = x_tr[:1]
    macs0 = count_macs(model, (example,))
    base = accuracy(model, x_te, y_te)
    print(f"seed {seed}: DigitsNet {macs0 / 1e6:.2f} M MACs, test {base:.2f} % (val {info['val']:.2f} %)")
    gen = torch.Generator().manual_seed(1000 + seed)
    calib = list(x_tr[torch.randperm(len(x_tr), generator=gen)[: args.calib * 64]].split(64))
    rows = [{"seed": seed, "method": "unpruned", "target": 1.0, "macs": 1.0, "none": base, "ft": base}]

    def stream(limit: int) -> BatchStream:
        return BatchStream(x_tr, y_tr, 64, seed=2000 + seed, limit=limit)

    for target in args.targets:
        common = {"calibration": calib, "target_macs": target, "budget": None, "quiet": True, "seed": seed}
        found: dict[str, nn.Module] = {}
        new: list[dict[str, Any]] = []
        for name, crit in IDAP_METHODS.items():
            t0 = time.perf_counter()
            res = idap_fx.optimize(model, example, importance=crit, **common)
            raw = idap_fx.optimize(model, example, importance=crit, compensation=False, **common)
            s = stream(args.ft_steps)
            per_step = math.ceil(args.ft_steps / len(res.report.steps))
            dis = idap_fx.optimize(
                model, example, importance=crit, train_loader=s, distill_steps=per_step, **common
            )
            found[name] = res.model
            new.append(
                {
                    "method": name, "macs": res.report.macs_ratio, "none": accuracy(res.model, x_te, y_te),
                    "nocomp": accuracy(raw.model, x_te, y_te), "distil": accuracy(dis.model, x_te, y_te),
                    "distil_steps": s.taken, "prune_steps": len(res.report.steps),
                    "time": time.perf_counter() - t0,
                }
            )  # fmt: skip
        div_macs = round(new[0]["macs"] * macs0)
        for name, global_pruning in TP_METHODS.items():
            t0 = time.perf_counter()
            tp_model, ratio, tp_macs = tp_prune_to_macs(model, example, div_macs, _ignored, global_pruning)
            found[name] = tp_model
            new.append(
                {
                    "method": name, "macs": tp_macs / macs0, "none": accuracy(tp_model, x_te, y_te),
                    "ratio": ratio, "time": time.perf_counter() - t0,
                }
            )  # fmt: skip
        for row in new:
            row["recal"] = accuracy(recalibrate_bn(found[row["method"]], calib), x_te, y_te)
            tuned = fine_tune(found[row["method"]], model, iter(stream(args.ft_steps)), args.ft_steps)
            row |= {"seed": seed, "target": target, "ft": accuracy(tuned, x_te, y_te)}
            print(
                f"  {target:.0%} {row['method']:<22} MACs {row['macs']:.3f}  none {row['none']:6.2f}  "
                f"no comp. {row.get('nocomp', math.nan):6.2f}  BN recal. {row['recal']:6.2f}  +FT {row['ft']:6.2f}  "
                f"+distil {row.get('distil', math.nan):6.2f}"
            )
        rows += new
    return rows


def _mean_std(values: Sequence[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def tables(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The published tables: mean ± std per (target, method), and divergence minus the better TP variant."""

    def pick(method: str, target: float, key: str) -> list[float]:
        return [r[key] for r in rows if r["method"] == method and r["target"] == target and key in r]

    main = []
    for target in args.targets:
        for m in METHODS:
            macs = pick(m, target, "macs")
            main.append(
                [f"{target:.0%}", m, f"{statistics.mean(macs):.3f} ({min(macs):.3f}–{max(macs):.3f})"]
                + [_mean_std(pick(m, target, k)) for k in ("none", "nocomp", "recal", "ft", "distil")]
            )
    margin = []
    for target in args.targets:
        tp = {
            k: max(statistics.mean(pick(m, target, k)) for m in TP_METHODS) for k in ("none", "recal", "ft")
        }
        d = {k: statistics.mean(pick("divergence", target, k)) for k in ("none", "recal", "ft", "distil")}
        margin.append([f"{target:.0%}", *(f"{d[k] - tp[k]:+.1f}" for k in ("none", "recal", "ft")),
                       f"{d['distil'] - tp['ft']:+.1f}"])  # fmt: skip
    cols = ["MACs target", "method", "MACs (mean, min–max)", "no training", "no training, no comp.",
            "no training + BN recal.", "+FT (same loop)", "idap_fx +distil"]  # fmt: skip
    return {
        "main": table(cols, main),
        "margin": table(
            ["MACs", "no training", "+ BN recal.", "+FT (same loop)", "idap_fx +distil vs TP +FT"], margin
        ),
    }


def summarize(rows: list[dict[str, Any]], args: argparse.Namespace, wall: float) -> str:
    """The markdown report: mean ± std per (target, method), the per-seed numbers, the verdict vs the target."""
    seeds = sorted({r["seed"] for r in rows})
    unpruned = _mean_std([r["none"] for r in rows if r["method"] == "unpruned"])
    t = tables(rows, args)
    lines = [
        "# Quality benchmark: handwritten digits (scikit-learn), DigitsNet trained here",
        "",
        f"Test accuracy (%) on the {args.test_size}-image test split, mean ± std over seeds {seeds} "
        f"(one test image = {100 / args.test_size:.2f} pp). Unpruned: {unpruned} %. "
        f"Calibration: {args.calib} batches of 64 training images. Training budget for +FT and +distil: "
        f"{args.ft_steps} AdamW steps of 64 labelled training images, the same for every method.",
        "",
        markdown_table(t["main"]["columns"], t["main"]["rows"]),
        "",
        "idap_fx divergence minus the better Torch-Pruning variant, percentage points (mean over seeds). "
        "Target: ≥ +3 without training, ≥ +1 after fine-tuning.",
        "",
        markdown_table(t["margin"]["columns"], t["margin"]["rows"]),
    ]
    lines += [
        "",
        "Per seed:",
        "",
        "| seed | target | method | MACs | no training | no comp. | BN recal. | +FT | +distil "
        "| distil steps used | idap prune steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["method"] != "unpruned":
            lines.append(
                f"| {r['seed']} | {r['target']:.0%} | {r['method']} | {r['macs']:.3f} | {r['none']:.1f} "
                f"| {r.get('nocomp', math.nan):.1f} | {r['recal']:.1f} | {r['ft']:.1f} "
                f"| {r.get('distil', math.nan):.1f} "
                f"| {r.get('distil_steps', '')} | {r.get('prune_steps', '')} |"
            )
    lines += ["", f"Wall time {wall:.0f} s, torch {torch.__version__}, 1 thread."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], args: argparse.Namespace, path: str) -> None:
    """Accuracy vs MACs ratio, one line per method: without training, + BN recalibration, after the same fine-tune."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    base = statistics.mean(r["none"] for r in rows if r["method"] == "unpruned")
    styles = {"divergence": "C0o-", "l1": "C1s-", "random": "C7^-", "divergence/group-mean": "C0o:",
              "torch-pruning": "C3D-", "torch-pruning global": "C3D:"}  # fmt: skip
    panels = (
        ("none", "no training"),
        ("recal", "no training + BN recal."),
        ("ft", f"+FT ({args.ft_steps} steps)"),
    )
    for ax, (key, title) in zip(axes, panels, strict=True):
        for method, style in styles.items():
            xs, ys, es = [1.0], [base], [0.0]
            for target in sorted(args.targets, reverse=True):
                sel = [r for r in rows if r["method"] == method and r["target"] == target]
                vals = [r[key] for r in sel]
                xs.append(statistics.mean(r["macs"] for r in sel))
                ys.append(statistics.mean(vals))
                es.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
            ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=3, label=method)
        ax.set_title(title)
        ax.set_xlabel("MACs (fraction of the unpruned model)")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%), DigitsNet on scikit-learn digits")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> None:
    """Run every seed, print and write the table and the plot."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.5])
    p.add_argument("--calib", type=int, default=8, help="calibration batches of 64 training images")
    p.add_argument("--ft-steps", type=int, default=100, help="training steps (batch 64) per method")
    p.add_argument("--out", default=str(RESULTS / "quality"), help="path prefix for .md, .png and .json")
    p.add_argument("--from-json", help="re-render the table and plot from a saved .json, running nothing")
    args = p.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        rows, wall = saved["rows"], saved["wall"]
        vars(args).update(saved["args"])
    else:
        single_thread()
        start = time.perf_counter()
        data = digits_splits(TRAIN["split_seed"])
        args.test_size = len(data["test"][1])
        rows = [r for s in args.seeds for r in run_seed(s, args, data)]
        wall = time.perf_counter() - start
    report = summarize(rows, args, wall)
    print(report)
    RESULTS.mkdir(exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write(report)
    keep = {k: getattr(args, k) for k in ("seeds", "targets", "calib", "ft_steps", "test_size")}
    with open(args.out + ".json", "w") as f:
        json.dump({"rows": rows, "wall": wall, "args": keep, "tables": tables(rows, args)}, f, indent=1)
    plot(rows, args, args.out + ".png")


if __name__ == "__main__":
    main()
