"""How much the demo's figures move: run to run, over seeds, and with 1 vs 2 torch threads.

Each configuration runs ``python -m idap_fx.demo`` in a fresh process (its own output
folder) and reads the ``demo.json`` it writes. Seed 0 at 1 thread runs twice: those two
must agree exactly (latency aside); the first also refreshes ``bench/results/demo.json``
(the table the README shows). Writes ``bench/results/demo_spread.{json,md}``; the README
quotes the spread next to the demo's agreement figure.

    .venv/bin/python bench/demo_spread.py   # 5 runs of ≈ 2 min CPU each, 2 at a time
    rm -r bench/_cache/demo_spread          # before measuring anew (finished runs are reused)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _results import save, table
from render_docs import RESULTS

PARALLEL = 2  # runs at a time (each its own process and threads)
CACHE = Path(__file__).resolve().parent / "_cache" / "demo_spread"  # one folder per run: reruns resume


def run(seed: int, threads: int, k: int, publish: bool = False) -> dict[str, object]:
    """One demo run in a fresh process (reused when its ``demo.json`` is already in the cache)."""
    out = CACHE / f"seed{seed}_threads{threads}_{k}"
    if not (out / "demo.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        extra = ["--results", str(RESULTS / "demo.json")] if publish else []
        cmd = [sys.executable, "-m", "idap_fx.demo", "--seed", str(seed), "--threads", str(threads)]
        t0 = time.perf_counter()
        subprocess.run([*cmd, "--out-dir", str(out), *extra], check=True, stdout=subprocess.DEVNULL)
        (out / "wall_s").write_text(f"{time.perf_counter() - t0:.1f}")
    data = json.loads((out / "demo.json").read_text())["data"]
    wall = (out / "wall_s").read_text() if (out / "wall_s").is_file() else "nan"
    s = data["summary"]
    return {
        "seed": seed,
        "threads": threads,
        "agreement": 100 * s["top1_agreement"],
        "macs": s["macs"][1],
        "params": s["params"][1],
        "parity": s["parity_rel_error"],
        "steps": data["pruning_steps"],
        "wall_s": float(wall),
    }


def main(argv: list[str] | None = None) -> None:
    """Run every configuration, write the table and the one-line spread the README quotes."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds at 1 thread (first: repeated)"
    )
    args = p.parse_args(argv)
    first = args.seeds[0]
    runs = [(first, 1), (first, 1), *((s, 1) for s in args.seeds[1:]), (first, 2)]  # (seed, torch threads)
    with ThreadPoolExecutor(PARALLEL) as pool:
        rows = list(pool.map(lambda i: run(*runs[i], k=i, publish=i == 0), range(len(runs))))
    base = rows[0]
    same = {k: rows[1][k] == base[k] for k in ("agreement", "macs", "params", "parity", "steps")}
    seeds = [r["agreement"] for r in rows if r["threads"] == 1]
    by_seed = {r["seed"]: r["agreement"] for r in rows if r["threads"] == 1}
    two = next(r for r in rows if r["threads"] == 2)
    seed_part = (
        f"over seeds {', '.join(map(str, by_seed))}: {min(seeds):.1f}–{max(seeds):.1f} % "
        f"(mean {statistics.mean(by_seed.values()):.1f}); "
        if len(by_seed) > 1
        else ""
    )
    verdict = "identical" if all(same.values()) else f"DIFFERENT {same}"
    spread = (
        f"run to run (seed {first}, 1 thread, two processes): {verdict}; {seed_part}"
        f"2 torch threads instead of 1 (seed {first}): {two['agreement']:.1f} % "
        f"({two['agreement'] - base['agreement']:+.1f} pp)"
    )
    cols = [
        "seed",
        "torch threads",
        "top-1 agreement",
        "MACs",
        "params",
        "parity",
        "pruning steps",
        "wall (s)",
    ]
    cells = [
        [r["seed"], r["threads"], f"{r['agreement']:.1f} %", f"{r['macs'] / 1e6:.1f} M", f"{r['params'] / 1e6:.3f} M",
         f"{r['parity']:.1e}", r["steps"], f"{r['wall_s']:.0f}"]
        for r in rows
    ]  # fmt: skip
    save(
        "demo_spread",
        "Demo figures over runs, seeds and torch thread counts",
        {"main": table(cols, cells)},
        markdown={"spread": spread},
        intro="`python -m idap_fx.demo --seed S --threads T`, each in a fresh process, on this machine.",
        data=rows,
    )
    print(spread)


if __name__ == "__main__":
    main()
