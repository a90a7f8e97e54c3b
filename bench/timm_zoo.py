"""One model per timm family under idap_fx: does it fx-trace, is a random 30 % plan exact, what freezes it.

A family is a module of ``timm.models`` (resnet, convnext, vision_transformer ...); its
model is its smallest-looking one (timm's size words: ``test``, ``atto`` ... ``small``), built
with ``pretrained=False`` (parameters initialised to about zero, such as layer scale, set to
U(0.5, 1.5) so a plan visibly changes the output) and fed one image of its default input
size. All run in one process under ``nice``, each with a time limit (SIGALRM). Per model: ``idap_fx.trace``; ``analyze``;
a random 30 % plan over the exact prunable groups, checked against the mask oracle
(prune == mask, relative error <= 1e-4); the parameters that plan removes, and those a
30 % plan over every prunable group (inexact ones too) removes. A family *passes* when the
oracle holds and the 30 % plan over all prunable groups removes >= 20 % of the parameters.
Writes ``bench/results/timm_zoo.json`` and the timm section of ``docs/zoo.md``.

    nohup nice -n 10 .venv/bin/python bench/timm_zoo.py > /tmp/timm_zoo.log 2>&1 &
    .venv/bin/python bench/timm_zoo.py --resume --rerun convnext --families convnext
    .venv/bin/python bench/timm_zoo.py --families resnet convnext --out -
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import signal
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "timm_zoo.json"
BEGIN, END = "<!-- timm:begin -->", "<!-- timm:end -->"


_SMALL = ("test", "atto", "femto", "pico", "nano", "xxxs", "xxs", "tiny", "xs", "mini", "small", "lite", "s")


def _smallness(name: str) -> tuple[int, int]:
    """A cheap size guess from the name: timm's size words, then name length."""
    tokens = name.replace(".", "_").split("_")
    rank = min((_SMALL.index(t) for t in tokens if t in _SMALL), default=len(_SMALL))
    return rank, len(name)


def pick_models(families: list[str] | None) -> dict[str, list[str]]:
    """Per timm family, its model names smallest-looking first (timm's size words, then name length)."""
    import timm
    from timm.models._registry import _model_to_module

    names: dict[str, list[str]] = {}
    for name in timm.list_models():
        fam = _model_to_module.get(name)
        if fam is not None and (not families or fam in families):
            names.setdefault(fam, []).append(name)
    order = {f: i for i, f in enumerate(families or [])}
    return {
        f: sorted(n, key=_smallness) for f, n in sorted(names.items(), key=lambda kv: order.get(kv[0], 0))
    }


def _frozen_cause(dg) -> str:  # noqa: ANN001
    """The most common first frozen reason among non-trivial frozen groups, node names dropped."""
    reasons = Counter()
    for g in dg.groups:
        if (
            not g.prunable
            and g.frozen_reason
            and not g.frozen_reason.startswith(("graph input", "parameter", "reaches graph output"))
        ):
            first = g.frozen_reason.split(";")[0]
            reasons[re.sub(r"\b[\w.]*_\d+\b|\b\w+\.\w+[\w.]*\b", "…", first)[:90]] += g.channels
    return reasons.most_common(1)[0][0] if reasons else ""


def _timeout(signum: int, frame: object) -> None:
    raise TimeoutError


def run_one(names: list[str], timeout: int) -> dict:
    """Trace, analyse and prune the first of ``names`` that builds; the result row."""
    import timm
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import random_plan, rel_err

    import idap_fx

    torch.set_num_threads(1)
    torch.manual_seed(0)
    for name in names[:4]:
        try:
            model = timm.create_model(name, pretrained=False).eval()
            break
        except Exception:  # some need extra arguments: not the family's representative
            continue
    else:
        return {"model": names[0], "status": "crash", "error": "no model of the family builds"}
    row: dict = {"model": name}
    with torch.no_grad():  # layer scale (1e-6) and zero-init residual ends would hide what a plan changes
        for p in model.parameters():
            if p.numel() and p.abs().max() < 1e-4:
                p.uniform_(0.5, 1.5)
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    x = torch.randn(1, *size)
    row["input"] = list(size)
    row["params"] = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(timeout)
    try:
        return _prune_row(row, model, x, idap_fx, random_plan, rel_err, t0)
    except TimeoutError:
        return {**row, "status": "timeout", "error": f"over {timeout} s"}
    except Exception as exc:
        return {**row, "status": "crash", "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    finally:
        signal.alarm(0)


def _prune_row(row: dict, model, x, idap_fx, random_plan, rel_err, t0: float) -> dict:  # noqa: ANN001
    import torch

    try:
        gm = idap_fx.trace(model, x)
    except Exception as exc:
        row.update(status="no fx trace", error=f"{type(exc).__name__}: {str(exc)[:200]}")
        return row
    dg = idap_fx.analyze(gm)
    row["analyze_s"] = round(time.perf_counter() - t0, 2)
    exact = [g for g in dg.prunable if g.exact]
    row.update(groups=len(dg.groups), prunable=len(dg.prunable), exact=len(exact))
    row["boundaries"] = sorted({re.sub(r"^\w+ ", "", r).split(" (rule")[0] for r in dg.boundaries.values()})[
        :5
    ]
    row["frozen_cause"] = _frozen_cause(dg)
    exact_ids = {g.id for g in exact}
    plan_exact = {k: v for k, v in random_plan(dg, 0.3).items() if k in exact_ids}
    plan_all = random_plan(dg, 0.3)
    with torch.no_grad():
        ref = gm(x)
        pruned = idap_fx.prune(gm, plan_exact, dg)
        row["oracle_err"] = rel_err(pruned(x), idap_fx.mask(gm, plan_exact, dg)(x)) if plan_exact else None
        row["changed"] = rel_err(pruned(x), ref) > 1e-3 if plan_exact else False
        row["removed_exact"] = 1 - sum(p.numel() for p in pruned.parameters()) / row["params"]
        pruned_all = idap_fx.prune(gm, plan_all, dg)
        pruned_all(x)
        row["removed_all"] = 1 - sum(p.numel() for p in pruned_all.parameters()) / row["params"]
    ok = row["oracle_err"] is not None and row["oracle_err"] <= 1e-4 and row["changed"]
    row["status"] = "pass" if ok and row["removed_all"] >= 0.2 else "fail"
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _row_md(fam: str, r: dict) -> str:
    if r["status"] in ("no fx trace", "timeout", "crash"):
        why = r.get("error", "")[:120].replace("|", "\\|").replace("\n", " ")
        return f"| {fam} | {r['model']} | {r['status']} | | | | | {why} |"
    err = "—" if r["oracle_err"] is None else f"{r['oracle_err']:.1e}"
    why = r["frozen_cause"] if r["status"] != "pass" else ""
    if r["status"] != "pass" and r["boundaries"]:
        why = f"no rule: {', '.join(r['boundaries'][:2])}; {why}"
    why = why.replace("|", "\\|")
    return (
        f"| {fam} | {r['model']} | **{r['status']}** | {r['exact']}/{r['prunable']} | {err} | "
        f"{r['removed_exact']:.0%} | {r['removed_all']:.0%} | {why} |"
    )


def markdown(results: dict[str, dict], timeout: int) -> str:
    traced = {f: r for f, r in results.items() if r["status"] in ("pass", "fail")}
    passed = sum(r["status"] == "pass" for r in traced.values())
    lines = [
        BEGIN,
        "## timm: one model per family",
        "",
        "Generated by `nice -n 10 .venv/bin/python bench/timm_zoo.py` (do not edit by hand): the smallest-looking",
        f"model of {len(results)} of timm's families (the run covers those listed; the rest are not measured yet),",
        f"`pretrained=False`, one image of its default size, {timeout} s per model (timeouts are not counted).",
        f"**{passed} of the {len(traced)} families that fx-trace pass** ({passed / max(len(traced), 1):.0%}): the "
        "random 30 % plan over the exact groups matches the mask oracle and a 30 % plan over every prunable",
        "group removes at least 20 % of the parameters. Columns: *exact/prunable* groups; *oracle* relative",
        "error; parameters removed by the exact plan and by the plan over all prunable groups (LayerNorm'd",
        "residual streams are inexact); *frozen by*: the ops without a rule and the most common reason the",
        "largest frozen groups give. `tests/graph/test_timm_zoo.py -m slow` runs the same check.",
        "",
        "| family | model | result | exact/prunable | oracle | removed (exact) | removed (all) | frozen by / error |",
        "|---|---|---|---|---|---|---|---|",
        *[_row_md(f, r) for f, r in sorted(results.items())],
        END,
    ]
    return "\n".join(lines) + "\n"


def _write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else ""
    if BEGIN in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END) + 1 :]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", help="only these families, in this order")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per model")
    parser.add_argument("--resume", action="store_true", help="keep the families already in the results")
    parser.add_argument("--rerun", nargs="*", default=[], help="with --resume: run these families again")
    parser.add_argument("--md-only", action="store_true", help="write the markdown from the saved results")
    parser.add_argument("--out", default=str(ROOT / "docs" / "zoo.md"), help="markdown file, '-' for stdout")
    args = parser.parse_args()
    results: dict[str, dict] = json.loads(RESULTS.read_text()) if args.resume or args.md_only else {}
    results = {f: r for f, r in results.items() if f not in args.rerun}
    if not args.md_only:
        for fam, names in pick_models(args.families).items():
            if fam in results:
                continue
            results[fam] = run_one(names, args.timeout)
            print(
                fam, results[fam]["model"], results[fam]["status"], results[fam].get("error", ""), flush=True
            )
            RESULTS.write_text(json.dumps(results, indent=1) + "\n")
            gc.collect()
    section = markdown(results, args.timeout)
    if args.out == "-":
        print(section)
    else:
        _write_section(Path(args.out), section)


if __name__ == "__main__":
    main()
