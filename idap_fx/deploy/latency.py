"""Measured speed-up of an optimized model over its original, in onnxruntime on CPU.

MAC counts promise a speed-up; this module checks what a deployment runtime
actually delivers. Both models are exported with ``export_onnx`` (so what is
timed is verified to compute the same thing as torch), loaded into two
onnxruntime sessions with identical settings, warmed up, and then timed in
interleaved pairs whose order alternates (original-optimized, then
optimized-original, ...): drift on a shared or thermally throttled machine then
affects both sides alike, and neither model always runs right after the other.

Every run is timed twice: wall clock (the latency a caller sees) and the
process's CPU time. On a machine shared with other jobs, wall clock includes
the time the OS gave the core to someone else (measured here: the same ONNX file
timed against itself on 2 cores at load average 9 gave medians of 6.1 vs 3.6 ms
wall, 2.00 vs 2.01 ms CPU). With one intra-op thread, onnxruntime computes on
the calling thread, so CPU time is what the latency would be on an idle core;
``contended`` flags runs where the two disagree by more than 20 %, and
``cpu_speedup`` is then the figure to trust.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnxruntime as ort
import torch

from idap_fx.deploy.onnx_export import export_onnx, onnx_feed
from idap_fx.errors import IdapError
from idap_fx.metrics import count_macs

__all__ = ["LatencyReport", "check_latency"]

ModelOrPath = torch.nn.Module | str | os.PathLike


@dataclass(frozen=True)
class LatencyReport:
    """Latency of both models in milliseconds and the speed-up they imply.

    ``*_median_ms`` / ``*_p90_ms`` are wall clock; ``*_cpu_ms`` are medians of the
    process's CPU time per run (with ``threads > 1`` that sums the threads' work and
    is no latency). ``macs_ratio`` is original MACs / optimized MACs (the reduction
    factor) and ``*_per_macs_ratio`` the speed-up divided by it (1.0: MACs fully
    turned into speed).
    """

    original_median_ms: float
    original_p90_ms: float
    optimized_median_ms: float
    optimized_p90_ms: float
    speedup: float
    threads: int
    runs: int
    original_cpu_ms: float
    optimized_cpu_ms: float
    cpu_speedup: float
    contended: bool
    macs_ratio: float | None = None
    speedup_per_macs_ratio: float | None = None
    cpu_speedup_per_macs_ratio: float | None = None

    def to_dict(self) -> dict[str, float | int | None]:
        """Plain JSON-able dict of every field."""
        return asdict(self)

    def __str__(self) -> str:
        lines = [
            f"{'':<10} {'median ms':>10} {'p90 ms':>10} {'CPU ms':>10}",
            f"{'original':<10} {self.original_median_ms:>10.3f} {self.original_p90_ms:>10.3f} "
            f"{self.original_cpu_ms:>10.3f}",
            f"{'optimized':<10} {self.optimized_median_ms:>10.3f} {self.optimized_p90_ms:>10.3f} "
            f"{self.optimized_cpu_ms:>10.3f}",
            f"speed-up {self.speedup:.2f}x wall, {self.cpu_speedup:.2f}x CPU time (onnxruntime CPU, "
            f"{self.threads} thread(s), {self.runs} interleaved runs each)",
        ]
        if self.contended:
            lines.append("the machine was busy (wall clock far above CPU time): trust the CPU-time speed-up")
        if self.macs_ratio is not None and self.speedup_per_macs_ratio is not None:
            lines.append(
                f"MACs reduced {self.macs_ratio:.2f}x: the speed-up is {100 * self.speedup_per_macs_ratio:.0f}% "
                f"(wall) / {100 * self.cpu_speedup_per_macs_ratio:.0f}% (CPU) of what MACs predict"
            )
        return "\n".join(lines)


def _onnx_path(model: ModelOrPath, inputs: tuple[torch.Tensor, ...], directory: str, name: str) -> str:
    """The ONNX file to time: ``model`` itself if it is a path, else a fresh verified export."""
    if isinstance(model, str | os.PathLike):
        path = os.fspath(model)
        if not os.path.isfile(path):
            raise IdapError(f"ONNX file {path} does not exist")
        return path
    path = os.path.join(directory, f"{name}.onnx")
    export_onnx(model, inputs, path, dynamic_batch=False)
    return path


def _session(path: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def check_latency(
    original: ModelOrPath,
    optimized: ModelOrPath,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    threads: int = 1,
    warmup: int = 10,
    repeats: int = 50,
    min_seconds: float | None = None,
    macs: tuple[float, float] | None = None,
) -> LatencyReport:
    """Time ``original`` against ``optimized`` (modules or ONNX paths) on ``example_inputs``.

    Runs ``warmup`` untimed calls of each, then at least ``repeats`` interleaved
    timed pairs, continuing until ``min_seconds`` have passed if given. The
    report says how much of the MAC reduction turned into speed, with
    ``macs=(original_macs, optimized_macs)`` or, when both models are modules,
    with MACs counted on them.
    """
    if threads < 1 or warmup < 0 or repeats < 1:
        raise IdapError(f"need threads >= 1, warmup >= 0, repeats >= 1; got {threads}, {warmup}, {repeats}")
    if macs is not None and min(macs) <= 0:
        raise IdapError(f"macs must be two positive counts (original, optimized), got {macs}")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    with tempfile.TemporaryDirectory(prefix="idap_fx_latency_") as tmp:
        sessions = [
            _session(_onnx_path(m, inputs, tmp, n), threads)
            for m, n in ((original, "original"), (optimized, "optimized"))
        ]
    feeds = [onnx_feed(s, inputs) for s in sessions]
    if macs is None and isinstance(original, torch.nn.Module) and isinstance(optimized, torch.nn.Module):
        counted = (count_macs(original, inputs), count_macs(optimized, inputs))
        macs = counted if min(counted) > 0 else None
    for session, feed in zip(sessions, feeds, strict=True):
        for _ in range(warmup):
            session.run(None, feed)
    wall: tuple[list[float], list[float]] = ([], [])
    cpu: tuple[list[float], list[float]] = ([], [])
    deadline = time.perf_counter() + (min_seconds or 0.0)
    while len(wall[0]) < repeats or time.perf_counter() < deadline:
        for k in (0, 1) if len(wall[0]) % 2 == 0 else (1, 0):
            start, start_cpu = time.perf_counter(), time.process_time()
            sessions[k].run(None, feeds[k])
            wall[k].append(1000 * (time.perf_counter() - start))
            cpu[k].append(1000 * (time.process_time() - start_cpu))
    (orig_med, orig_p90), (opt_med, opt_p90) = (
        (float(np.median(t)), float(np.percentile(t, 90))) for t in wall
    )
    orig_cpu, opt_cpu = (float(np.median(t)) for t in cpu)
    speedup = orig_med / opt_med
    cpu_speedup = orig_cpu / opt_cpu if opt_cpu > 0 else float("nan")
    contended = threads == 1 and max(orig_med / max(orig_cpu, 1e-9), opt_med / max(opt_cpu, 1e-9)) > 1.2
    macs_ratio = macs[0] / macs[1] if macs is not None else None
    return LatencyReport(
        original_median_ms=orig_med,
        original_p90_ms=orig_p90,
        optimized_median_ms=opt_med,
        optimized_p90_ms=opt_p90,
        speedup=speedup,
        threads=threads,
        runs=len(wall[0]),
        original_cpu_ms=orig_cpu,
        optimized_cpu_ms=opt_cpu,
        cpu_speedup=cpu_speedup,
        contended=contended,
        macs_ratio=macs_ratio,
        speedup_per_macs_ratio=speedup / macs_ratio if macs_ratio is not None else None,
        cpu_speedup_per_macs_ratio=cpu_speedup / macs_ratio if macs_ratio is not None else None,
    )
