"""One-shot quality of each compensation mode (and ridge) on the quality matrix's models, no training.

``optimize(target_macs=t, budget=None, compensation=mode)`` with every other option at its
default, on the data splits of ``quality_matrix.py`` (``_matrix_tasks``): DigitsNet and
MobileDigitsNet (test accuracy, per seed), ImageNet MobileNetV2 (top-1 agreement with the
unpruned model on unseen photos, 128 px, 32 calibration views) and all-MiniLM-L6-v2
(cosine × 100 on held-out sentences). ``--ridge`` sets ``compensation.RIDGE`` (relative to
the kept inputs' mean variance). Rows are appended to ``--out`` as they finish.

    .venv/bin/python bench/compensation.py --models DigitsNet MobileDigitsNet --seeds 0 1
    .venv/bin/python bench/compensation.py --models mobilenet_v2 --targets 0.7 --modes least_squares --ridge 1e-3
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from _data import RESULTS
from _matrix_tasks import Task, digits_task, minilm_task, mobilenet_task

import idap_fx
from idap_fx.method import compensation
from idap_fx.metrics import count_macs

MODELS = ("DigitsNet", "MobileDigitsNet", "mobilenet_v2", "minilm")


def task_for(name: str, seed: int) -> Task:
    """The matrix's task (the digits models are trained here per seed)."""
    if name == "mobilenet_v2":
        return mobilenet_task(128, 32, 64)
    if name == "minilm":
        return minilm_task(4, 256)
    return digits_task(name, seed, 8)


def run(task: Task, target: float, mode: str, seed: int) -> dict[str, Any]:
    """One one-shot result."""
    t0 = time.perf_counter()
    res = idap_fx.optimize(task.model, task.example, calibration=task.calib, target_macs=target, budget=None,
                           quiet=True, strict=False, seed=seed, compensation=mode)  # fmt: skip
    macs0 = count_macs(task.model, task.example)
    return {
        "metric": task.metric(task.model, res.model, task.test),
        "macs_ratio": count_macs(res.model, task.example) / macs0,
        "seconds": time.perf_counter() - t0,
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Run the requested cells and append them to ``--out``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["DigitsNet", "MobileDigitsNet"], choices=MODELS)
    p.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.5, 0.3])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--modes", nargs="+", default=list(compensation.MODES), choices=compensation.MODES)
    p.add_argument("--ridge", type=float, default=compensation.RIDGE)
    p.add_argument("--out", default=str(RESULTS / "compensation.json"))
    p.add_argument("--render", action="store_true", help="only rewrite the .md from --out")
    args = p.parse_args(argv)
    if args.render:
        render(json.loads(Path(args.out).read_text()), Path(args.out).with_suffix(".md"))
        return
    torch.set_num_threads(1)
    compensation.RIDGE = args.ridge
    out = Path(args.out)
    saved = json.loads(out.read_text()) if out.exists() else {"rows": []}
    for name in args.models:
        for seed in args.seeds if "Digits" in name else [0]:
            task = task_for(name, seed)
            for target in args.targets:
                for mode in args.modes:
                    row = {"model": name, "seed": seed, "target": target, "mode": mode, "ridge": args.ridge}
                    row |= run(task, target, mode, seed)
                    saved["rows"].append(row)
                    out.write_text(json.dumps(saved, indent=1))
                    print(f"{name} seed {seed} {target}: {mode} (ridge {args.ridge:g}) {row['metric']:.1f} "
                          f"MACs {row['macs_ratio']:.3f} {row['seconds']:.0f} s", flush=True)  # fmt: skip
    render(saved, out.with_suffix(".md"))


def render(saved: dict[str, Any], path: Path) -> None:
    """Mean vs least squares (the default ridge) vs reconstruct per cell, then each ridge over the cells all
    ridges ran."""
    rows = saved["rows"]
    cells = sorted(
        {(r["model"], r["seed"], r["target"]) for r in rows}, key=lambda c: (MODELS.index(c[0]), c[1], -c[2])
    )

    def value(cell: tuple, mode: str, ridge: float | None) -> float | None:
        hits = [r["metric"] for r in rows if (r["model"], r["seed"], r["target"]) == cell and r["mode"] == mode
                and (mode == "mean" or r["ridge"] == ridge)]  # fmt: skip
        return hits[-1] if hits else None

    lines = ["# One-shot quality by compensation mode (no training)", "", saved.get("source", ""), "",
             f"| model | seed | MACs | mean | least squares (ridge {compensation.RIDGE:g}) | reconstruct |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for cell in cells:
        m, ls = value(cell, "mean", None), value(cell, "least_squares", compensation.RIDGE)
        rc = value(cell, "reconstruct", compensation.RIDGE)
        fmt = lambda v: "—" if v is None else f"{v:.1f}"  # noqa: E731
        lines.append(f"| {cell[0]} | {cell[1]} | {cell[2]:.0%} | {fmt(m)} | {fmt(ls)} | {fmt(rc)} |")
    ridges = sorted({r["ridge"] for r in rows if r["mode"] == "least_squares"})
    common = [c for c in cells if all(value(c, "least_squares", g) is not None for g in ridges)]
    if len(ridges) > 1 and common:
        lines += ["", f"Ridge sweep over the {len(common)} cells every ridge ran:", "",
                  "| ridge | " + " | ".join(f"{c[0]} s{c[1]} {c[2]:.0%}" for c in common) + " | mean |",
                  "|---" * (len(common) + 2) + "|"]  # fmt: skip
        for g in ridges:
            vals = [value(c, "least_squares", g) or 0.0 for c in common]
            lines.append(
                f"| {g:g} | " + " | ".join(f"{v:.1f}" for v in vals) + f" | {sum(vals) / len(vals):.1f} |"
            )
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
