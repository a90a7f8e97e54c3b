"""The per-layer plan page: an ``optimize`` / ``plan`` report's layer table as self-contained HTML.

Behind ``idap-fx viz --plan report.json``; the coupling viewer is ``idap_fx.visualize``.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping
from typing import Any

from idap_fx.deploy.files import write_text
from idap_fx.errors import PlanError


def visualize_plan(report: str | os.PathLike[str] | Mapping[str, Any], path: str | os.PathLike[str]) -> str:
    """Write the per-layer plan of an ``optimize`` / ``plan`` report (JSON path or dict) as an HTML page.

    One row per weight layer: width before → after with a bar for the share removed, and
    the layer's share of the original MACs; the report's warnings head the page.
    """
    if not isinstance(report, Mapping):
        try:
            with open(report) as f:
                report = json.load(f)
        except (OSError, ValueError) as exc:
            raise PlanError(f"--plan {report}: cannot read a JSON report ({exc})") from None
    layers = report.get("layers")
    if not isinstance(layers, list):
        raise PlanError("the report has no per-layer plan ('layers'): write it with idap-fx optimize or plan")
    rows = "".join(_plan_row(r) for r in layers)
    warn = "".join(f"<p class=warn>WARNING: {html.escape(w)}</p>" for w in report.get("warnings", []))
    ratio = report.get("macs_ratio")
    head = f"MACs kept: {ratio:.3f} of the original" if isinstance(ratio, float) else ""
    page = (
        "<!doctype html><meta charset=utf-8><title>idap_fx plan</title><style>body{font:14px sans-serif}"
        "td,th{padding:2px 8px;text-align:left}.bar{display:inline-block;height:10px;background:#d55;"
        "margin-right:6px}.warn{color:#b00;font-weight:bold}</style>"
        f"<h1>idap_fx per-layer plan</h1>{warn}<p>{head}</p><table><tr><th>layer</th><th>kind</th>"
        f"<th>width before → after</th><th>removed</th><th>MACs share (original)</th></tr>{rows}</table>"
    )
    return write_text(path, page)


def _plan_row(r: Mapping[str, Any]) -> str:
    removed = 100 * r["removed_share"]
    share = "" if r["macs_share"] is None else f"{100 * r['macs_share']:.1f} %"
    return (
        f"<tr><td>{html.escape(str(r['module']))}</td><td>{html.escape(str(r['kind']))}</td>"
        f"<td>{r['width_before']} → {r['width_after']}</td>"
        f"<td><div class=bar style='width:{removed:.0f}px'></div>{removed:.1f} %</td><td>{share}</td></tr>"
    )
