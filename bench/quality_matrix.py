"""Quality matrix: models × MAC targets × methods, one-shot and after one shared recovery loop.

Models (``_matrix_tasks``): DigitsNet (quality.py), MobileDigitsNet (depthwise, inverted
residuals, SE) and ResDigitsNet (a plain ResNet, added after the defaults were chosen: the
unseen-model check) trained here on scikit-learn's digits (metric: test accuracy), ImageNet
MobileNetV2 on photos split *by photo* into calibration/training, validation and test
photos (metric: top-1 agreement with the unpruned model on the test photos), and
all-MiniLM-L6-v2 on standard-library docstrings split by module (metric: cosine to the
unpruned embedding × 100 on held-out sentences).

Methods: ``idap_fx`` (``optimize`` with its defaults), ``alloc:<name>`` (each allocator,
``optimize(allocator=name)``), ``random`` (idap_fx with random importance),
Torch-Pruning 1.6.1 ``MagnitudePruner`` with ``tp:global-l1`` (L1, global ranking),
``tp:uniform-l1`` (L1, the same ratio in every layer) and ``tp:taylor`` (first-order
Taylor, global; gradients of cross-entropy to the labels, or to the unpruned model's
top-1 for MobileNetV2, or of an in-batch contrastive loss to the unpruned embeddings for
MiniLM). Every Torch-Pruning ratio is bisected to the MACs of the ``idap_fx`` result
(within 1 %); every MAC count is ``idap_fx.metrics.count_macs``.

Recovery, identical for every method (``recover``): ``--steps`` AdamW steps (weight decay
1e-4, frozen BatchNorm, the task's learning rate) on the task's training stream, loss KL
to the unpruned model (+ cross-entropy where labels exist; 1 − cosine for MiniLM);
every ``--eval-every`` steps the validation metric is measured and the best state
(including the one-shot state, step 0) is kept, so recovery cannot make a model worse
on validation data.

Rows are written to the JSON after every result (``--out``); ``--resume`` skips rows already
there. ``--from-json A.json [B.json ...]`` merges and re-renders, running nothing
(``render_matrix.py`` writes the .md, the .png and the docs tables).

    .venv/bin/python bench/quality_matrix.py --quick                       # ~1-2 min smoke run
    .venv/bin/python bench/quality_matrix.py --models digits mobile-digits   # 5 seeds each
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from _data import RESULTS, single_thread
from _matrix_tasks import Task, digits_task, minilm_task, mobilenet_task
from render_matrix import render
from torch import nn

import idap_fx
from idap_fx.method.recovery import train_with_frozen_batchnorm
from idap_fx.metrics import count_macs
from idap_fx.options import PruneOptions, Recovery

MODELS = ("digits", "mobile-digits", "res-digits", "mobilenet_v2", "minilm")
ALLOCATORS = ("global", "group", "cost", "sensitivity")
TP_METHODS = {"tp:global-l1": ("l1", True), "tp:uniform-l1": ("l1", False), "tp:taylor": ("taylor", True)}
# Torch-Pruning keeps widths aligned like idap_fx's default (``round_to``), so both give hardware-friendly widths.
TP_ROUND_TO = PruneOptions().round_to
METHODS = ("idap_fx", *TP_METHODS, *(f"alloc:{a}" for a in ALLOCATORS), "random")


def build_task(name: str, seed: int, args: argparse.Namespace) -> Task:
    """The task for ``name`` (trained or loaded for ``seed`` where the model is trained here)."""
    if name == "digits":
        return digits_task("DigitsNet", seed, args.calib)
    if name == "mobile-digits":
        return digits_task("MobileDigitsNet", seed, args.calib)
    if name == "res-digits":
        return digits_task("ResDigitsNet", seed, args.calib)
    if name == "mobilenet_v2":
        return mobilenet_task(args.size, args.calib * 8, args.test_views)
    if name == "minilm":
        return minilm_task(max(2, args.calib // 2), args.test_sentences)
    raise SystemExit(f"unknown model {name!r}; choose from {MODELS}")


def idap_kwargs(method: str) -> dict[str, Any] | None:
    """``optimize`` keyword arguments of an idap_fx method, or None where this idap_fx lacks it."""
    if method == "idap_fx":
        return {}
    if method == "random":
        return {"importance": "random"}
    return {"allocator": method.split(":", 1)[1]}


def width_stats(original: nn.Module, pruned: nn.Module, heads: tuple[str, ...]) -> tuple[float, int]:
    """(smallest kept fraction of a layer's output width, smallest output width) over convolutions and linears."""
    now = dict(pruned.named_modules())
    fractions, widths = [1.0], []
    for name, mod in original.named_modules():
        if name in heads or not isinstance(mod, (nn.Conv2d, nn.Linear)) or name not in now:
            continue
        width = now[name].weight.shape[0]
        fractions.append(width / mod.weight.shape[0])
        widths.append(width)
    return min(fractions), min(widths, default=0)


def _example(task: Task) -> Any:
    return task.example if len(task.example) > 1 else task.example[0]


def taylor_grads(task: Task, batches: int = 4) -> dict[str, torch.Tensor]:
    """Gradients of the task's Taylor loss on ``batches`` training batches, by parameter name."""
    model = copy.deepcopy(task.model).eval()
    model.zero_grad()
    for inp, lab in itertools.islice(task.stream(99), batches):
        with torch.no_grad():
            ref = task.model(*inp)
        task.taylor_loss(model(*inp), ref, lab).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def tp_prune(
    task: Task, ratio: float, kind: str, global_pruning: bool, grads: dict[str, torch.Tensor]
) -> nn.Module:
    """A copy of the task's model pruned by Torch-Pruning's ``MagnitudePruner`` in one step."""
    import torch_pruning as tp

    m = copy.deepcopy(task.model).eval()
    if kind == "taylor":
        importance = tp.importance.TaylorImportance()
        for n, p in m.named_parameters():
            p.grad = grads[n].clone() if n in grads else None
    else:
        importance = tp.importance.MagnitudeImportance(p=1)
    pruner = tp.pruner.MagnitudePruner(
        m, _example(task), importance=importance, pruning_ratio=ratio, global_pruning=global_pruning,
        ignored_layers=task.ignored(m), round_to=TP_ROUND_TO,
    )  # fmt: skip
    pruner.step()
    m.zero_grad(set_to_none=True)
    return m


def tp_to_macs(
    task: Task, target: int, kind: str, global_pruning: bool, grads: dict[str, torch.Tensor]
) -> nn.Module:
    """Bisect the Torch-Pruning ratio to ``target`` MACs (within 1 %); the closest model found."""
    lo, hi, best = 0.0, 0.95, None
    for _ in range(14):
        if hi - lo < 2e-3:  # uniform ratios move the MACs in coarse steps: closer is not reachable
            break
        mid = (lo + hi) / 2
        m = tp_prune(task, mid, kind, global_pruning, grads)
        err = count_macs(m, task.example) / target - 1
        if best is None or abs(err) < abs(best[0]):
            best = (err, m)
        if abs(err) <= 0.01:
            break
        lo, hi = (mid, hi) if err > 0 else (lo, mid)
    assert best is not None
    return best[1]


def recover(task: Task, student: nn.Module, steps: int, eval_every: int, seed: int) -> tuple[nn.Module, int]:
    """The shared recovery loop: AdamW on the task loss, best validation state kept (step 0 included)."""
    model = copy.deepcopy(student)
    teacher = task.model.eval()
    opt = torch.optim.AdamW(model.parameters(), lr=task.lr, weight_decay=1e-4)
    best = (task.metric(teacher, model, task.val), 0, copy.deepcopy(model.state_dict()))
    train_with_frozen_batchnorm(model)
    for step, (inp, lab) in enumerate(itertools.islice(task.stream(seed), steps), 1):
        with torch.no_grad():
            ref = teacher(*inp)
        loss = task.loss(model(*inp), ref, lab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            score = task.metric(teacher, model, task.val)
            if score > best[0]:
                best = (score, step, copy.deepcopy(model.state_dict()))
            train_with_frozen_batchnorm(model)
    model.load_state_dict(best[2])
    return model.eval(), best[1]


def prune(
    task: Task, method: str, target: float, seed: int, ref_macs: int, grads: dict[str, torch.Tensor]
) -> Any:
    """The pruned model of one method (None where this idap_fx lacks the method)."""
    if method in TP_METHODS:
        return tp_to_macs(task, ref_macs, *TP_METHODS[method], grads)
    kw = idap_kwargs(method)
    if kw is None:
        return None
    res = idap_fx.optimize(task.model, task.example, calibration=task.calib, target_macs=target,
                           budget=None, quiet=True, strict=False, seed=seed, **kw)  # fmt: skip
    return res.model


def run_cell(task: Task, method: str, target: float, seed: int, ref_macs: int, grads: Any, args: Any) -> dict:
    """One row: prune, measure one-shot, run the shared recovery, measure again."""
    t0 = time.perf_counter()
    row: dict[str, Any] = {"model": args.model, "target": target, "method": method, "seed": seed}
    try:
        pruned = prune(task, method, target, seed, ref_macs, grads)
    except Exception as exc:  # one failing method must not lose the rest of the matrix
        return row | {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    if pruned is None:
        return row | {"error": "not available in this idap_fx"}
    prune_s = time.perf_counter() - t0
    tuned, best_step = recover(task, pruned, args.steps, args.eval_every, seed)
    keep, width = width_stats(task.model, pruned, task.heads)
    return row | {
        "macs_ratio": count_macs(pruned, task.example) / args.macs0, "one_shot": task.metric(task.model, pruned, task.test),
        "recovered": task.metric(task.model, tuned, task.test), "best_step": best_step, "min_keep": keep,
        "min_width": width, "prune_s": prune_s, "total_s": time.perf_counter() - t0,
    }  # fmt: skip


def run_model(name: str, seed: int, args: argparse.Namespace, out: dict[str, Any]) -> None:
    """Every (target, method) for one model and seed; each row is saved as soon as it exists."""
    task = build_task(name, seed, args)
    args.model, args.macs0 = name, count_macs(task.model, task.example)
    done = {(r["model"], r["target"], r["method"], r["seed"]) for r in out["rows"]}
    base = task.metric(task.model, task.model, task.test)
    ran = out["configs"].get(name, {}).get("seeds", []) if args.resume else []
    out["configs"][name] = {**config(args), "metric": task.metric_name, "macs": args.macs0, **task.info}
    out["configs"][name]["seeds"] = sorted(set(ran) | set(args.seeds))  # a resumed run adds seeds
    if (name, 1.0, "unpruned", seed) not in done:
        save(out, args, {"model": name, "target": 1.0, "method": "unpruned", "seed": seed, "macs_ratio": 1.0,
                         "one_shot": base, "recovered": base})  # fmt: skip
    print(f"{name} seed {seed}: {args.macs0 / 1e6:.2f} M MACs, {task.metric_name} {base:.2f}", flush=True)
    grads = taylor_grads(task) if "tp:taylor" in args.methods else {}
    default = f"alloc:{PruneOptions().allocator}"
    for target in args.targets:
        for method in sorted(args.methods, key=lambda m: m != "idap_fx"):  # the default first: TP matches it
            if (name, target, method, seed) in done:
                continue
            ref_macs = _reference_macs(out, name, target, seed, args.macs0)
            ours = [
                r
                for r in out["rows"]
                if (r["model"], r["target"], r["method"], r["seed"]) == (name, target, "idap_fx", seed)
            ]
            if method == default and ours:  # the default's own allocator: the same call, the same result
                row = ours[0] | {"method": method, "same_as": "idap_fx"}
            else:
                row = run_cell(task, method, target, seed, ref_macs, grads, args)
            save(out, args, row)
            if "error" in row:
                print(f"  {target:.0%} {method:<17} {row['error']}", flush=True)
                continue
            print(
                f"  {target:.0%} {method:<17} MACs {row['macs_ratio']:.3f} one-shot {row['one_shot']:6.2f} "
                f"recovered {row['recovered']:6.2f} (best step {row['best_step']}) min keep "
                f"{row['min_keep']:.2f} / {row['min_width']} {row.get('total_s', 0):.0f} s",
                flush=True,
            )


def _reference_macs(out: dict[str, Any], name: str, target: float, seed: int, macs0: int) -> int:
    """The MACs Torch-Pruning is matched to: those of the idap_fx default's result (else the target)."""
    for r in out["rows"]:
        if (r["model"], r["target"], r["method"], r["seed"]) == (
            name,
            target,
            "idap_fx",
            seed,
        ) and "error" not in r:
            return round(r["macs_ratio"] * macs0)
    return round(target * macs0)


def config(args: argparse.Namespace) -> dict[str, Any]:
    """The run's configuration as stored with the results."""
    keys = (
        "seeds",
        "targets",
        "methods",
        "steps",
        "eval_every",
        "calib",
        "size",
        "test_views",
        "test_sentences",
    )
    opts = PruneOptions()
    defaults = {
        k: getattr(opts, k) for k in ("allocator", "min_keep", "round_to", "importance", "max_prune_ratio")
    }
    defaults["passes"] = None
    defaults["compensation"] = Recovery().compensation_mode
    return {k: getattr(args, k) for k in keys} | {
        "quick": args.quick, "torch": torch.__version__, "idap_fx_defaults": defaults, "tp_round_to": TP_ROUND_TO,
    }  # fmt: skip


def save(out: dict[str, Any], args: argparse.Namespace, row: dict[str, Any]) -> None:
    """Append ``row`` and rewrite the JSON (partial results survive an interrupted run)."""
    out["rows"].append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out + ".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(args.out)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the requested cells (or re-render saved ones) and write the results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.5, 0.3])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="default: 0-4 for the digits models, 0 else"
    )
    p.add_argument("--steps", type=int, default=100, help="recovery steps, every method alike")
    p.add_argument("--eval-every", type=int, default=10, help="validation every N recovery steps")
    p.add_argument(
        "--calib", type=int, default=8, help="calibration batches (64 digits / 8 views / 16 sentences)"
    )
    p.add_argument("--size", type=int, default=160, help="MobileNetV2 input resolution")
    p.add_argument("--test-views", type=int, default=96, help="MobileNetV2 test views (of the test photos)")
    p.add_argument("--test-sentences", type=int, default=256, help="MiniLM held-out test sentences")
    p.add_argument("--quick", action="store_true", help="tiny end-to-end check (~1-2 min)")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --out, skip their cells")
    p.add_argument("--out", default=str(RESULTS / "quality_matrix.json"))
    p.add_argument("--from-json", nargs="+", help="merge saved JSON files and re-render, running nothing")
    args = p.parse_args(argv)
    if args.from_json:
        merged: dict[str, Any] = {"rows": [], "configs": {}}
        for f in args.from_json:
            saved = json.loads(Path(f).read_text())
            merged["rows"] += saved["rows"]
            merged["configs"] |= saved["configs"]
        Path(args.out).write_text(json.dumps(merged, indent=1))
        render(merged, Path(args.out).with_suffix(""))
        return
    if args.quick:
        args.models = ["mobile-digits"]
        args.targets, args.steps, args.eval_every, args.calib, args.seeds = [0.3], 10, 5, 2, [0]
        args.methods = ["idap_fx", "random", "tp:global-l1", "tp:taylor"]
        args.out = str(Path(args.out).with_name("quality_matrix_quick.json"))
    single_thread()
    out: dict[str, Any] = {"rows": [], "configs": {}}
    if args.resume and Path(args.out).exists():
        out = json.loads(Path(args.out).read_text())
        out["rows"] = [r for r in out["rows"] if "error" not in r]  # failed cells run again
    asked = args.seeds
    for name in args.models:
        args.seeds = asked or ([0, 1, 2, 3, 4] if "digits" in name and not args.quick else [0])
        for seed in args.seeds:
            run_model(name, seed, args, out)
    args.seeds = asked
    render(out, Path(args.out).with_suffix(""))


if __name__ == "__main__":
    main()
