"""Peak memory of ``optimize`` + ``export_onnx`` against a plain forward + export of the same model and data.

Each measurement runs in a fresh process (peak RSS, ``ru_maxrss``, includes torch itself):

* ``plain``: build the model, run it on the calibration batches (no grad), export ONNX;
* ``optimize``: build the model, ``idap_fx.optimize`` to 50 % of the MACs on the same
  batches (default budget, ``strict=False``), export the result to ONNX.

The ratio optimize / plain is the figure (goal ≤ 1.5×). Models: ResNet-50 and ViT-B/16
(``weights=None``, seeded), 4 calibration batches of 8 images at 224×224, 1 torch thread.
Writes ``bench/results/peak_memory.{json,md}`` (models not measured in a run keep their earlier row).

    .venv/bin/python bench/peak_memory.py                 # both models (about an hour on 2 cores)
    .venv/bin/python bench/peak_memory.py --models resnet50
    .venv/bin/python bench/peak_memory.py --merge peak_memory_r50   # rows of a run with --out peak_memory_r50
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import save, table
from render_docs import RESULTS

MODELS = ("resnet50", "vit_b_16")
BATCHES, BATCH, SIZE = 4, 8, 224


def _job(model_name: str, mode: str, out: str) -> dict[str, float]:
    import torch
    import torchvision

    import idap_fx

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)(weights=None).eval()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(BATCH, 3, SIZE, SIZE, generator=g) for _ in range(BATCHES)]
    x = calib[0][:1]
    t0 = time.perf_counter()
    if mode == "plain":
        with torch.no_grad():
            for b in calib:
                model(b)
        idap_fx.export_onnx(model, x, os.path.join(out, "m.onnx"))
        extra = {}
    else:
        res = idap_fx.optimize(model, x, calibration=calib, target_macs=0.5, strict=False, quiet=True)
        res.export_onnx(os.path.join(out, "m.onnx"))
        extra = {"macs_ratio": res.report.macs_ratio, "steps": len(res.report.steps)}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"peak_mib": peak, "wall_s": time.perf_counter() - t0, **extra}


def measure(model_name: str, mode: str) -> dict[str, float]:
    """One fresh process: the job's peak RSS (MiB) and wall time."""
    with tempfile.TemporaryDirectory(prefix="idap_mem_") as out:
        code = (
            "import json, sys; sys.path.insert(0, sys.argv[1]); import peak_memory as p; "
            "print('RESULT', json.dumps(p._job(sys.argv[2], sys.argv[3], sys.argv[4])))"
        )
        env = os.environ | {"OMP_NUM_THREADS": "1"}
        proc = subprocess.run(
            [sys.executable, "-c", code, str(Path(__file__).parent), model_name, mode, out],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def main(argv: list[str] | None = None) -> None:
    """Measure every model in both modes, print and write the ratios."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--out", default="peak_memory", help="results name under bench/results/")
    p.add_argument(
        "--merge", nargs="*", default=[], help="also take these results names' rows (run nothing new)"
    )
    args = p.parse_args(argv)
    path = RESULTS / f"{args.out}.json"
    earlier = json.loads(path.read_text())["data"] if path.is_file() else []
    if args.merge:  # rows measured by separate runs (--out NAME), the later file winning per model
        for name in args.merge:
            merged = json.loads((RESULTS / f"{name}.json").read_text())["data"]
            earlier = [r for r in earlier if r["model"] not in {m["model"] for m in merged}] + merged
        args.models = []
    rows = [r for r in earlier if r["model"] not in args.models]  # keep the models not re-measured
    for name in args.models:
        plain, opt = measure(name, "plain"), measure(name, "optimize")
        ratio = opt["peak_mib"] / plain["peak_mib"]
        rows.append({"model": name, "plain": plain, "optimize": opt, "ratio": ratio})
        print(
            f"{name}: optimize + export {opt['peak_mib']:.0f} MiB, plain {plain['peak_mib']:.0f} MiB: {ratio:.2f}×"
        )
    cells = [
        [r["model"], f"{r['plain']['peak_mib']:,.0f}", f"{r['optimize']['peak_mib']:,.0f}",
         f"{r['ratio']:.2f}×", "yes" if r["ratio"] <= 1.5 else "**no**",
         f"{r['optimize'].get('macs_ratio', float('nan')):.3f}", f"{r['optimize']['wall_s']:.0f}"]
        for r in rows
    ]  # fmt: skip
    cols = ["model", "plain forward + export (MiB)", "optimize + export (MiB)", "ratio", "≤ 1.5×", "MACs kept",
            "optimize wall (s)"]  # fmt: skip
    save(
        args.out,
        "Peak memory: optimize + export vs a plain forward + export",
        {"main": table(cols, cells)},
        intro=f"Peak RSS of a fresh process, {BATCHES} calibration batches of {BATCH} × 3 × {SIZE} × {SIZE}, "
        "target_macs=0.5, default budget, 1 torch thread, weights=None.",
        data=rows,
    )


if __name__ == "__main__":
    main()
