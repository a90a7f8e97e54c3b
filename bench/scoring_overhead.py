"""Scoring overhead: ``idap_fx.method.scoring.score`` vs a plain forward over the same calibration batches.

For ResNet-50, MobileNetV2 and ViT-B/16 (torchvision, ``weights=None``: timing does not
depend on the weights) at 224×224, batch 8: the median over ``--repeats`` interleaved
runs of (a) ``gm(batch)`` for every batch under ``no_grad`` and (b) a full divergence
scoring, ``score(gm, dg, batches)`` (streamed statistics at every consumption site plus
the weight norms). The ratio b / a is the overhead; the target is ≤ 1.3×. Analysis
(``idap_fx.analyze``) is done once before timing and is not counted. ``--profile``
prints the top of a cProfile of one scoring run.

    .venv/bin/python bench/scoring_overhead.py               # 1 thread; writes bench/results/scoring_overhead.{json,md}
    .venv/bin/python bench/scoring_overhead.py --profile --models vit_b_16
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torchvision
from _data import single_thread
from _results import save, table

import idap_fx
from idap_fx.method.scoring import score

MODELS = ("resnet50", "mobilenet_v2", "vit_b_16")


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(name: str, batches: list[torch.Tensor], repeats: int) -> dict[str, float]:
    """Median seconds of the plain forwards and of one scoring, over interleaved repeats."""
    gm = idap_fx.trace(getattr(torchvision.models, name)(weights=None), batches[0][:1])
    dg = idap_fx.analyze(gm)

    def forward() -> None:
        with torch.no_grad():
            for b in batches:
                gm(b)

    def scoring() -> None:
        score(gm, dg, batches, "divergence")

    forward()  # warm-up (allocator, first-call paths)
    plain, scored = [], []
    for _ in range(repeats):
        plain.append(_time(forward))
        scored.append(_time(scoring))
    return {
        "forward": statistics.median(plain),
        "score": statistics.median(scored),
        "units": sum(g.size for g in dg.prunable),
        "groups": len(dg.prunable),
    }


def profile(name: str, batches: list[torch.Tensor], top: int = 25) -> str:
    """cProfile of one scoring run (cumulative time), as text."""
    gm = idap_fx.trace(getattr(torchvision.models, name)(weights=None), batches[0][:1])
    dg = idap_fx.analyze(gm)
    prof = cProfile.Profile()
    prof.runcall(score, gm, dg, batches, "divergence")
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main(argv: Sequence[str] | None = None) -> None:
    """Measure every model, print and write the table (and a profile when asked)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--batches", type=int, default=2, help="calibration batches of 8 at 224×224")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", action="store_true", help="print a cProfile of one scoring run per model")
    p.add_argument("--out", default="scoring_overhead", help="results name under bench/results/")
    args = p.parse_args(argv)
    single_thread()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 3, 224, 224, generator=gen) for _ in range(args.batches)]
    rows = []
    for name in args.models:
        r = measure(name, batches, args.repeats)
        ratio = r["score"] / r["forward"]
        rows.append([name, r["groups"], r["units"], f"{r['forward']:.2f}", f"{r['score']:.2f}", f"{ratio:.2f}×",
                     "yes" if ratio <= 1.3 else "no"])  # fmt: skip
        print(rows[-1], flush=True)
        if args.profile:
            print(profile(name, batches))
    cols = ["model", "prunable groups", "units", "plain forward (s)", "score (s)", "ratio", "≤ 1.3×"]
    path = save(
        args.out,
        "Scoring overhead: divergence scoring vs a plain forward over the same batches",
        {"main": table(cols, rows)},
        intro=f"{args.batches} batches of 8 × 3 × 224 × 224, median of {args.repeats} interleaved repeats, "
        f"{args.threads} torch thread(s), torch {torch.__version__}.",
    )
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
