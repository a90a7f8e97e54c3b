"""The README's main job on its built-in default: ResNet-50 (weights=None), analyzed and pruned 50 %.

Run with ``make demo`` (or ``python -m idap_fx.demo``). Prints the dependency groups and
the MACs / parameters before and after, measured with ``torch.utils.flop_counter``.
"""

from __future__ import annotations

import time

import torch
import torchvision
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

import idap_fx


def _macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2


def main() -> None:
    """Trace, analyze and prune the default model; print what happened."""
    console = Console()
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    t0 = time.perf_counter()
    gm = idap_fx.trace(model, x)
    t1 = time.perf_counter()
    dg = idap_fx.analyze(gm)
    plan = {}
    for g in dg.prunable:
        idx = list(range(g.size // 2))
        while idx and g.violated_part(idx):
            idx.pop()
        if idx:
            plan[g.id] = idx
    pruned = idap_fx.prune(gm, plan, dg)
    t2 = time.perf_counter()

    table = Table(title="resnet50: dependency groups")
    for col in ("group", "units", "prunable", "removed", "members", "frozen because"):
        table.add_column(col)
    for g in dg.groups:
        table.add_row(
            g.id,
            str(g.size),
            "yes" if g.prunable else "no",
            str(len(plan.get(g.id, []))),
            str(len(g.members)),
            g.frozen_reason or "",
        )
    console.print(table)
    with torch.no_grad():
        same_shape = pruned(x).shape == gm(x).shape
    before, after = _macs(gm, x), _macs(pruned, x)
    p0 = sum(p.numel() for p in gm.parameters())
    p1 = sum(p.numel() for p in pruned.parameters())
    summary = Table(title="before / after (50 % of every prunable group removed)")
    for col in ("", "before", "after", "ratio"):
        summary.add_column(col)
    summary.add_row("MACs (G)", f"{before / 1e9:.2f}", f"{after / 1e9:.2f}", f"{after / before:.2f}")
    summary.add_row("params (M)", f"{p0 / 1e6:.2f}", f"{p1 / 1e6:.2f}", f"{p1 / p0:.2f}")
    console.print(summary)
    console.print(
        f"groups: {len(dg.groups)} ({len(dg.prunable)} prunable); trace {t1 - t0:.2f} s, "
        f"analyze + prune {t2 - t1:.2f} s; output shape unchanged: {same_shape}"
    )


if __name__ == "__main__":
    main()
