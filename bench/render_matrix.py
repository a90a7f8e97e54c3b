"""Render the quality matrix (``quality_matrix.py``'s JSON) as markdown, a plot, and the docs' tables.

``render`` writes ``<prefix>.md`` and ``<prefix>.png``. ``update_docs`` replaces the text
between ``<!-- quality_matrix:begin -->`` and ``<!-- quality_matrix:end -->`` in
``docs/benchmarks.md`` and ``README.md`` with the goal table, so the published figures
are generated from the results, never typed.

    .venv/bin/python bench/render_matrix.py [bench/results/quality_matrix.json] [--check]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- quality_matrix:begin -->", "<!-- quality_matrix:end -->"
GOAL_ONE_SHOT, GOAL_RECOVERED = 3.0, 0.0
ORDER = ("digits", "mobile-digits", "res-digits", "mobilenet_v2", "minilm")
DATA_KEYS = {
    "digits": ("test_images",),
    "mobile-digits": ("test_images",),
    "res-digits": ("test_images",),
    "mobilenet_v2": ("size", "train_photos", "val_photos", "test_photos", "test_views"),
    "minilm": ("seq", "test_sentences"),
}


def _vals(rows: list[dict[str, Any]], model: str, target: float, method: str, key: str) -> list[float]:
    return [
        r[key] for r in rows if (r["model"], r["target"], r["method"]) == (model, target, method) and key in r
    ]


def _fmt(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def _models(rows: list[dict[str, Any]]) -> list[str]:
    present = {r["model"] for r in rows}
    return [m for m in ORDER if m in present] + sorted(present - set(ORDER))


def _targets(rows: list[dict[str, Any]], model: str) -> list[float]:
    return sorted(
        {r["target"] for r in rows if r["model"] == model and r["method"] != "unpruned"}, reverse=True
    )


def _methods(rows: list[dict[str, Any]], model: str) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in rows if r["model"] == model and r["method"] != "unpruned"))


def goal_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, target): the idap_fx default vs the best Torch-Pruning variant, one-shot and recovered."""
    out = []
    for model in _models(rows):
        for target in _targets(rows, model):
            cell: dict[str, Any] = {"model": model, "target": target}
            for key in ("one_shot", "recovered"):
                ours = _vals(rows, model, target, "idap_fx", key)
                tps = {m: statistics.mean(v) for m in _methods(rows, model)
                       if m.startswith("tp:") and (v := _vals(rows, model, target, m, key))}  # fmt: skip
                if not ours or not tps:
                    continue
                best = max(tps, key=tps.__getitem__)
                cell[key] = (statistics.mean(ours), best, tps[best], statistics.mean(ours) - tps[best])
                cell[key + "_macs"] = (
                    statistics.mean(_vals(rows, model, target, "idap_fx", "macs_ratio")),
                    statistics.mean(_vals(rows, model, target, best, "macs_ratio")),
                )
            cell["min_keep"] = min(_vals(rows, model, target, "idap_fx", "min_keep"), default=float("nan"))
            if "one_shot" in cell and "recovered" in cell:
                out.append(cell)
    return out


def goal_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: margin of the default over the best TP variant per cell, with pass/fail vs the goal."""
    lines = [
        f"| model | MACs | idap_fx one-shot | best TP one-shot | margin (goal ≥ +{GOAL_ONE_SHOT:.0f}) "
        "| idap_fx recovered | best TP recovered | margin (goal ≥ +0) | idap_fx min keep |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def tp(c: dict[str, Any], key: str) -> str:
        ours, theirs = c[key + "_macs"]
        off = f", MACs {theirs:.3f} vs {ours:.3f}" if abs(theirs / ours - 1) > 0.02 else ""
        return f"{c[key][2]:.1f} ({c[key][1]}{off})"

    for c in goal_rows(rows):
        o, r = c["one_shot"], c["recovered"]
        ok_o = "pass" if o[3] >= GOAL_ONE_SHOT else "**fail**"
        ok_r = "pass" if r[3] >= GOAL_RECOVERED else "**fail**"
        lines.append(
            f"| {c['model']} | {c['target']:.0%} | {o[0]:.1f} | {tp(c, 'one_shot')} | {o[3]:+.1f} {ok_o} "
            f"| {r[0]:.1f} | {tp(c, 'recovered')} | {r[3]:+.1f} {ok_r} | {c['min_keep']:.2f} |"
        )
    return "\n".join(lines)


def _calibration(model: str, calib: int) -> str:
    """What ``--calib`` meant for ``model`` (quality_matrix.build_task)."""
    if model == "minilm":
        return f"{max(2, calib // 2)} batches of 32 sentences"
    if model == "mobilenet_v2":
        return f"{calib} batches of 8 views of the training photos"
    return f"{calib} batches of 64 training images"


def _config_line(model: str, cfg: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    seeds = sorted({r["seed"] for r in rows if r["model"] == model})
    keys = DATA_KEYS.get(model, ())
    extra = {k: cfg[k] for k in keys if k in cfg}
    return (
        f"**{model}** — metric: {cfg.get('metric', '?')}; seeds {seeds}; recovery {cfg.get('steps')} steps "
        f"(validation every {cfg.get('eval_every')}); calibration {_calibration(model, cfg.get('calib', 0))}; "
        f"{cfg.get('macs', 0) / 1e6:.1f} M MACs unpruned; idap_fx defaults {cfg.get('idap_fx_defaults')}; "
        f"TP round_to {cfg.get('tp_round_to')}; {extra}{'; QUICK run' if cfg.get('quick') else ''}"
    )


def markdown(out: dict[str, Any]) -> str:
    """The full report: configuration, goal table, per-model matrix (mean ± std over seeds)."""
    rows = out["rows"]
    lines = [
        "# Quality matrix (bench/quality_matrix.py)",
        "",
        "Generated by `bench/render_matrix.py` from `quality_matrix.json`. Cells: mean ± std over seeds. "
        "Torch-Pruning (TP) is matched to the MACs of the `idap_fx` default result; every MAC count is "
        "`idap_fx.metrics.count_macs`. *recovered*: after the same recovery loop for every method (best "
        "validation state kept, so never below one-shot on validation data). *min keep*: the smallest "
        "fraction of a layer's output width kept (classifier excluded); *min width*: the smallest layer width. "
        "Torch-Pruning keeps widths aligned to the same multiple as idap_fx's default (`round_to`, in the "
        "configuration below); on MiniLM it prunes MLP units only (it cannot re-shape the traced attention "
        "heads), idap_fx prunes heads and MLP units. `tp:taylor` ranks by first-order Taylor importance "
        "(gradients of cross-entropy to the labels, else to the unpruned model's top-1; MiniLM: in-batch "
        "contrastive loss to the unpruned embeddings). `alloc:<default>` is the `idap_fx` row itself "
        "(the same call). A `–` is a cell that did not run. In the goal table a TP variant whose MACs differ "
        "from the default's by more than 2 % (uniform ratios move the MACs in coarse steps) shows both.",
        "",
        "## Configuration that ran",
        "",
        *[f"- {_config_line(m, out['configs'].get(m, {}), rows)}" for m in _models(rows)],
        "",
        "## The default vs the best Torch-Pruning variant (issue goal: ≥ +3 pp one-shot, ≥ +0 after recovery)",
        "",
        goal_table(rows),
        "",
    ]
    errors = [r for r in rows if "error" in r]
    if errors:
        lines += ["## Cells that failed", ""]
        lines += [
            f"- {r['model']} {r['target']:.0%} {r['method']} seed {r['seed']}: {r['error']}" for r in errors
        ]
        lines.append("")
    for model in _models(rows):
        targets = _targets(rows, model)
        if not targets:
            continue
        base = _fmt(_vals(rows, model, 1.0, "unpruned", "one_shot"))
        lines += [f"## {model} (unpruned: {base})", "", "| method | " + " | ".join(
            f"{t:.0%} MACs one-shot | {t:.0%} recovered | {t:.0%} min keep / width" for t in targets) + " |",
            "|---|" + "---|---|---|" * len(targets)]  # fmt: skip
        for method in _methods(rows, model):
            cells = []
            for t in targets:
                keep = _vals(rows, model, t, method, "min_keep")
                width = _vals(rows, model, t, method, "min_width")
                macs = _vals(rows, model, t, method, "macs_ratio")
                cells += [
                    f"{_fmt(_vals(rows, model, t, method, 'one_shot'))} (MACs {statistics.mean(macs):.3f})"
                    if macs
                    else "–",
                    _fmt(_vals(rows, model, t, method, "recovered")),
                    f"{min(keep):.2f} / {min(width)}" if keep else "–",
                ]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(out: dict[str, Any], path: Path) -> None:
    """Metric vs MACs, one row of panels per model (one-shot, recovered), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, models = out["rows"], _models(out["rows"])
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 3.6 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for j, key in enumerate(("one_shot", "recovered")):
            ax = axes[i][j]
            for k, method in enumerate(_methods(rows, model)):
                ts = _targets(rows, model)
                ts = [t for t in ts if _vals(rows, model, t, method, key)]
                ys = [statistics.mean(_vals(rows, model, t, method, key)) for t in ts]
                es = [statistics.pstdev(_vals(rows, model, t, method, key)) for t in ts]
                style = "--" if method.startswith("tp:") else ("-" if method == "idap_fx" else ":")
                ax.errorbar(ts, ys, yerr=es, fmt="o" + style, color=f"C{k}", capsize=2, label=method,
                            linewidth=2.5 if method == "idap_fx" else 1.2)  # fmt: skip
            ax.set_title(f"{model}: {key.replace('_', '-')}")
            ax.set_xlabel("MACs target (fraction kept)")
            ax.set_ylabel(out["configs"].get(model, {}).get("metric", "metric")[:40], fontsize=8)
            ax.invert_xaxis()
            ax.grid(alpha=0.3)
        if _methods(rows, model):
            axes[i][1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render(out: dict[str, Any], prefix: Path) -> None:
    """Write ``prefix``.md and ``prefix``.png."""
    if not out["rows"]:
        return
    prefix.with_suffix(".md").write_text(markdown(out))
    plot(out, prefix.with_suffix(".png"))
    print(prefix.with_suffix(".md").read_text())


DOCS = (ROOT / "docs/benchmarks.md", ROOT / "README.md")


def docs_block(out: dict[str, Any], readme: bool) -> str:
    """The marked block (goal table + configuration) as README.md / docs/*.md carry it."""
    cfg = "; ".join(_config_line(m, out["configs"].get(m, {}), out["rows"]) for m in _models(out["rows"]))
    block = (
        f"{BEGIN}\n<!-- generated by bench/render_matrix.py from bench/results/quality_matrix.json; "
        f"do not edit -->\n\n{goal_table(out['rows'])}\n\nConfiguration: {cfg}. Full matrix (every method, "
        f"min keep fractions): [bench/results/quality_matrix.md](bench/results/quality_matrix.md).\n\n{END}"
    )
    return block if readme else block.replace("](bench/results/", "](../bench/results/")


def _with_block(f: Path, out: dict[str, Any]) -> str:
    text = f.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{f}: add the markers {BEGIN} and {END} where the table belongs")
    before, rest = text.split(BEGIN, 1)
    return before + docs_block(out, f.name == "README.md") + rest.split(END, 1)[1]


def update_docs(out: dict[str, Any], files: tuple[Path, ...] = DOCS) -> None:
    """Replace the marked block of every file in ``files`` with the generated goal table."""
    for f in files:
        f.write_text(_with_block(f, out))


def drifted(out: dict[str, Any], files: tuple[Path, ...] = DOCS) -> list[str]:
    """The files whose marked block differs from what ``out`` renders to (empty: the docs match)."""
    return [str(f) for f in files if f.read_text() != _with_block(f, out)]


def main() -> None:
    """Render the JSON given (default: bench/results/quality_matrix.json) and update the docs."""
    args = [a for a in sys.argv[1:] if a != "--check"]
    path = Path(args[0]) if args else ROOT / "bench/results/quality_matrix.json"
    out = json.loads(path.read_text())
    if "--check" in sys.argv:  # compare only: the docs' goal tables against the JSON
        bad = drifted(out)
        raise SystemExit(f"out of date (run bench/render_matrix.py): {', '.join(bad)}" if bad else 0)
    render(out, path.with_suffix(""))
    update_docs(out)


if __name__ == "__main__":
    main()
