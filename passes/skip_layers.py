"""Stage 2: flow-guided layer skipping (method notes §3).

Candidates (``idap_fx.layers``: residual branches, shape-preserving chains, and opt-in
least-squares projections of channel-changing chains) are tried in ascending order of
layer divergence. Each trial removes one candidate, recovers (the user's ``fine_tune``
callback, or distillation when a ``train_loader`` is given; nothing otherwise) and checks
the budget: it is accepted when its quality delta δ_E = quality(N) − quality(N') is at
most ``tau_layer`` (when given) and the global budget still holds; otherwise the
candidate is marked essential and never tried again. After every accepted removal the
remaining candidates are found and scored again on the new graph. At most ``max_skips``
removals; with recovery, a final recovery from the pass's input model ends the pass.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from idap_fx.layer_stats import layer_scores
from idap_fx.layers import Candidate, find_candidates, remove
from idap_fx.metrics import count_macs, count_params
from idap_fx.recovery import distill, run_fine_tune
from idap_fx.trace import record_shapes


@dataclass
class SkipConfig:
    """Everything stage 2 needs besides the model (filled in by ``idap_fx.optimize``).

    ``kinds`` selects the candidate kinds; add ``"projection"`` for (c), the fitted 1×1
    conv / linear replacement of channel-changing chains (off by default). ``max_units``
    is the longest chain (in conv / linear / attention layers) tried as one candidate.
    """

    example_inputs: tuple[Any, ...]
    calibration: list[Any]
    budget: Any  # idap_fx.budget.Budget
    max_skips: int = 5
    tau_layer: float | None = None
    fine_tune: Callable[[Any, Any], Any] | None = None
    train_loader: Any = None
    distill_steps: int | None = None
    progress: Callable[..., Any] = field(default=lambda it, **kw: it)
    kinds: tuple[str, ...] = ("residual", "identity")
    max_units: int = 2
    on_accept: Callable[..., None] | None = None  # (candidate, fit, model, metrics): idap_fx.curve


class SkipLayers(PassBase):
    """The stage-2 pass. After ``call``: ``removed`` (accepted removals, in order), ``trials``
    (every decision, rejected ones included), ``essential`` (keys of rejected candidates),
    ``stop_reason`` and ``timings``."""

    def __init__(self, config: SkipConfig) -> None:
        super().__init__()
        if config.max_skips < 0:
            raise ValueError(f"max_skips must be >= 0, got {config.max_skips}")
        self.cfg = config
        self.removed: list[dict[str, Any]] = []
        self.trials: list[dict[str, Any]] = []
        self.essential: set[tuple[str, str, str]] = set()
        self.steps: list[Any] = []  # stage 1's step records; stage 2 reports through ``removed``
        self.schedule_used: list[float] = []
        self.stop_reason = ""
        self.timings: dict[str, float] = {}

    def _time(self, phase: str, start: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - start

    def requires(self, graph_module: fx.GraphModule) -> None:
        if not any("tensor_meta" in n.meta for n in graph_module.graph.nodes if n.op == "placeholder"):
            raise ValueError("skip_layers needs shapes on the graph: build it with idap_fx.trace")

    def ensures(self, graph_module: fx.GraphModule) -> None:
        graph_module.graph.lint()

    def _recover(self, model: fx.GraphModule, teacher: fx.GraphModule) -> tuple[fx.GraphModule, str]:
        cfg = self.cfg
        t0 = time.perf_counter()
        note = ""
        if cfg.fine_tune is not None:
            model, note = run_fine_tune(cfg.fine_tune, model, teacher), "fine_tune callback"
        elif cfg.train_loader is not None:
            distill(model, teacher, cfg.train_loader, steps=cfg.distill_steps, progress=cfg.progress)
            note = "distilled"
        self._time("skip_recover", t0)
        return model, note

    def _scored(self, gm: fx.GraphModule) -> tuple[list[Candidate], dict[Any, float], dict[Any, Any]]:
        t0 = time.perf_counter()
        cands = [
            c
            for c in find_candidates(gm, kinds=self.cfg.kinds, max_units=self.cfg.max_units)
            if c.key not in self.essential
        ]
        self._time("skip_discover", t0)
        t0 = time.perf_counter()
        scores, fits = layer_scores(gm, cands, self.cfg.calibration) if cands else ({}, {})
        self._time("skip_score", t0)
        return cands, scores, fits

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        cfg = self.cfg
        current = copy.deepcopy(graph_module)
        record_shapes(current, cfg.example_inputs)  # shapes must match this graph (stage 1 may have run)
        t0 = time.perf_counter()
        quality = cfg.budget.check(current).quality
        self._time("skip_budget", t0)
        macs, params = count_macs(current, cfg.example_inputs), count_params(current)
        cands, scores, fits = self._scored(current)
        for _ in cfg.progress(itertools.count(), desc="skip_layers"):
            if len(self.removed) >= cfg.max_skips:
                self.stop_reason = f"max_skips ({cfg.max_skips}) removals made"
                break
            todo = [c for c in cands if c.key not in self.essential]
            if not todo:
                self.stop_reason = f"no candidates left ({len(self.essential)} essential)"
                break
            cand = min(todo, key=lambda c: scores[c.key])
            t0 = time.perf_counter()
            trial = remove(current, cand, cfg.example_inputs, fits.get(cand.key))
            self._time("skip_rewrite", t0)
            trial, note = self._recover(trial, current)
            t0 = time.perf_counter()
            verdict = cfg.budget.check(trial)
            self._time("skip_budget", t0)
            delta = quality - verdict.quality
            ok = verdict.ok and (cfg.tau_layer is None or delta <= cfg.tau_layer)
            record = {
                "name": cand.name,
                "kind": cand.kind,
                "score": scores[cand.key],
                "delta": delta,
                "budget_consumed": verdict.consumed,
                "accepted": ok,
                "nodes": len(cand.nodes),
                "note": note,
            }
            if not ok:
                why = "budget" if not verdict.ok else f"delta {delta:.4g} > tau_layer {cfg.tau_layer}"
                self.trials.append(record | {"note": ", ".join(filter(None, [note, f"essential: {why}"]))})
                self.essential.add(cand.key)
                continue
            new_macs, new_params = count_macs(trial, cfg.example_inputs), count_params(trial)
            record |= {"macs_saved": macs - new_macs, "params_saved": params - new_params}
            self.trials.append(record)
            self.removed.append(record)
            if cfg.on_accept is not None:
                metrics = (new_macs, new_params, verdict.quality, verdict.consumed)
                cfg.on_accept(cand, fits.get(cand.key), trial, metrics)
            current, quality, macs, params = trial, verdict.quality, new_macs, new_params
            cands, scores, fits = self._scored(current)
        if self.removed and (cfg.fine_tune is not None or cfg.train_loader is not None):
            current = self._final_recovery(current, graph_module)
        return PassResult(current, bool(self.removed))

    def _final_recovery(self, model: fx.GraphModule, teacher: fx.GraphModule) -> fx.GraphModule:
        """Recover once more from the pass's input model; kept only if it stays within budget."""
        tuned, _ = self._recover(copy.deepcopy(model), teacher)
        t0 = time.perf_counter()
        ok = self.cfg.budget.check(tuned).ok
        self._time("skip_budget", t0)
        return tuned if ok else model
