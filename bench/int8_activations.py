"""int8 activation type: uint8 (U8S8) against int8 (S8S8) activations, accuracy and ONNX Runtime speed.

Both with per-channel symmetric int8 weights (``quantize.quantize_qdq``), the same calibration views
and no layer kept fp32; fp32 for reference. Models: real MobileNetV2 (ImageNet weights) and
ResNet-50 / ResNet-18 (``weights=None``: latency is real, agreement describes a random network),
224 px, photos split by photo (calibration / evaluation, as ``edge.py``). Latency: batch 1, 1 thread,
the three files interleaved in rotating order, median CPU time after 5 warm-up runs. The machine's
CPU flags decide which kernels ONNX Runtime uses (VNNI or not), so they are recorded.

    .venv/bin/python bench/int8_activations.py   # writes bench/results/int8_activations.{json,md}
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from _data import augmented_views, imagenet_mobilenet_v2, photos, single_thread
from _results import save, table
from onnxruntime.quantization.shape_inference import quant_pre_process

from idap_fx.deploy import int8_layers as q
from idap_fx.deploy.onnx_export import onnx_feed

RUNS = 30


def _cpu_flags() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split()
    except (OSError, IndexError):
        return "unknown"
    return ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags)


def _cpu_ms(paths: list[str], x: torch.Tensor) -> list[float]:
    sessions = [q.OrtModule(p).session for p in paths]
    feeds = [onnx_feed(s, (x,)) for s in sessions]
    for s, f in zip(sessions, feeds, strict=True):
        for _ in range(5):
            s.run(None, f)
    times: list[list[float]] = [[] for _ in paths]
    for r in range(RUNS):
        for k in np.roll(np.arange(len(paths)), r):
            c0 = time.process_time()
            sessions[k].run(None, feeds[k])
            times[k].append(1000 * (time.process_time() - c0))
    return [float(np.median(t)) for t in times]


def main() -> None:
    single_thread()
    pics = photos()
    names = sorted(pics)
    eval_names = names[::4]
    cal = augmented_views([pics[n] for n in names if n not in eval_names], 32, 224, seed=1)
    ev = augmented_views([pics[n] for n in eval_names], 128, 224, seed=2)
    models = {
        "mobilenet_v2": imagenet_mobilenet_v2(),
        "resnet50": torchvision.models.resnet50(weights=None).eval(),
        "resnet18": torchvision.models.resnet18(weights=None).eval(),
    }
    rows, data = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            fp32, pre = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "pre.onnx")
            torch.onnx.export(
                model, (cal[0][:1],), fp32, input_names=["x"], dynamo=False, dynamic_axes={"x": {0: "b"}}
            )
            quant_pre_process(fp32, pre, skip_symbolic_shape=True)
            ref = q.run_outputs(pre, ev)
            paths, acc = [pre], {}
            for act in ("int8", "uint8"):
                out = os.path.join(tmp, f"{act}.onnx")
                q.quantize_qdq(pre, out, cal, [], activations=act)
                got = q.run_outputs(out, ev)
                acc[act] = (q.output_deviation(ref, got), q.output_agreement(ref, got))
                paths.append(out)
            ms = _cpu_ms(paths, ev[0][:1])
            data.append(
                {"model": name, "cpu_ms": dict(zip(("fp32", "s8s8", "u8s8"), ms, strict=True)), "acc": acc}
            )
            rows.append(
                [
                    name,
                    f"{acc['int8'][0]:.4f} / {acc['uint8'][0]:.4f}",
                    f"{100 * acc['int8'][1]:.1f} / {100 * acc['uint8'][1]:.1f} %",
                    " / ".join(f"{m:.2f}" for m in ms),
                    f"{ms[0] / ms[1]:.2f}x / {ms[0] / ms[2]:.2f}x",
                ]
            )
            print(rows[-1], flush=True)
    cols = [
        "model",
        "output deviation S8S8 / U8S8",
        "top-1 agreement S8S8 / U8S8",
        "CPU ms fp32 / S8S8 / U8S8",
        "speed-up S8S8 / U8S8",
    ]
    intro = (
        f"224 px, batch 1, 1 thread, {RUNS} interleaved runs (median CPU time), 32 calibration and 128 "
        f"evaluation views, no layer kept fp32. CPU: {os.cpu_count()} cores, flags {_cpu_flags()}; "
        f"1-minute load average {os.getloadavg()[0]:.1f} at the end."
    )
    save(
        "int8_activations",
        "int8 activation type: S8S8 vs U8S8",
        {"main": table(cols, rows)},
        intro=intro,
        data=data,
    )


if __name__ == "__main__":
    main()
