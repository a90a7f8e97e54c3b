"""Stage 2: flow-guided layer skipping (method notes §3).

Candidates (``idap_fx.rewrite.skip_candidates``: residual branches, shape-preserving chains, and opt-in
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
from typing import Any

from idap_fx.passes.base import IdapPass, PassContext
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from idap_fx.capture.trace import record_shapes
from idap_fx.method.skip_scores import layer_scores
from idap_fx.metrics import count_macs, count_params
from idap_fx.options import SkipOptions
from idap_fx.rewrite.skip_candidates import Candidate, find_candidates, remove
from idap_fx.rewrite.surgery import discard, return_free_memory


class SkipLayers(IdapPass):
    """The stage-2 pass. ``record.removed``: accepted removals, in order; ``record.trials``: every
    decision, rejected ones included; ``essential``: keys of rejected candidates."""

    name = "skip_layers"
    options_class = SkipOptions

    def __init__(self, ctx: PassContext, options: SkipOptions | None = None) -> None:
        super().__init__(ctx, options)
        self.opts: SkipOptions = self.options  # type: ignore[assignment]
        self.essential: set[tuple[str, str, str]] = set()

    def _recover(
        self, model: fx.GraphModule, teacher: fx.GraphModule, what: str
    ) -> tuple[fx.GraphModule, str]:
        with self.timed("skip_recover"):
            return self.train_recovery(model, teacher, what)

    def _scored(self, gm: fx.GraphModule) -> tuple[list[Candidate], dict[Any, float], dict[Any, Any]]:
        with self.timed("skip_discover"):
            found = find_candidates(gm, kinds=self.opts.candidate_kinds, max_units=self.opts.max_units)
            cands = [c for c in found if c.key not in self.essential]
        with self.timed("skip_score"):
            scores, fits = layer_scores(gm, cands, self.ctx.calibration) if cands else ({}, {})
        return cands, scores, fits

    def _trial(self, current: fx.GraphModule, cand: Candidate, fit: Any, quality: float) -> tuple[Any, dict]:
        """Remove ``cand``, recover, check: the trial model (None if rejected) and its record."""
        with self.timed("skip_rewrite"):
            trial = remove(current, cand, self.ctx.example_inputs, fit)
        trial, note = self._recover(trial, current, cand.name)
        with self.timed("skip_budget"):
            verdict = self.ctx.budget.check(trial)
        delta = quality - verdict.quality
        tau = self.opts.tau_layer
        ok = verdict.ok and (tau is None or delta <= tau)
        record = {
            "name": cand.name,
            "kind": cand.kind,
            "score": 0.0,
            "delta": delta,
            "budget_consumed": verdict.consumed,
            "accepted": ok,
            "nodes": len(cand.nodes),
            "note": note,
            "quality": verdict.quality,
        }
        if not ok:
            why = "budget" if not verdict.ok else f"delta {delta:.4g} > tau_layer {tau}"
            record["note"] = ", ".join(filter(None, [note, f"essential: {why}"]))
            discard(trial)
        return (trial if ok else None), record

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        ctx, opts, rec = self.ctx, self.opts, self.record
        # the input's modules shared, its graph copied: trials rewrite copies, only shapes are recorded here
        current = fx.GraphModule(
            graph_module, copy.deepcopy(graph_module.graph), class_name=type(graph_module).__name__
        )
        record_shapes(current, ctx.example_inputs)  # shapes must match this graph (stage 1 may have run)
        with self.timed("skip_budget"):
            quality = ctx.budget.check(current).quality
        macs, params = count_macs(current, ctx.example_inputs), count_params(current)
        cands, scores, fits = self._scored(current)
        for _ in ctx.progress(itertools.count(), desc="skip_layers"):
            if len(rec.removed) >= opts.max_skips:
                rec.stop_reason = f"max_skips ({opts.max_skips}) removals made"
                break
            todo = [c for c in cands if c.key not in self.essential]
            if not todo:
                rec.stop_reason = f"no candidates left ({len(self.essential)} essential)"
                break
            cand = min(todo, key=lambda c: scores[c.key])
            trial, record = self._trial(current, cand, fits.get(cand.key), quality)
            record["score"] = scores[cand.key]
            new_quality = record.pop("quality")
            if trial is None:
                rec.trials.append(record)
                self.essential.add(cand.key)
                continue
            new_macs, new_params = count_macs(trial, ctx.example_inputs), count_params(trial)
            record |= {"macs_saved": macs - new_macs, "params_saved": params - new_params}
            rec.trials.append(record)
            rec.removed.append(record)
            if ctx.recorder is not None:
                ctx.recorder.on_skip(
                    cand, fits.get(cand.key), (new_macs, new_params, new_quality, record["budget_consumed"])
                )
            discard(current)  # the pass input's modules live on in the input itself
            current, quality, macs, params = trial, new_quality, new_macs, new_params
            return_free_memory()
            cands, scores, fits = self._scored(current)
        if rec.removed and ctx.recovery.trains:
            current = self._final_recovery(current, graph_module)
        return PassResult(current, bool(rec.removed))

    def _final_recovery(self, model: fx.GraphModule, teacher: fx.GraphModule) -> fx.GraphModule:
        """Recover once more from the pass's input model; kept only if it stays within budget."""
        tuned, _ = self._recover(copy.deepcopy(model), teacher, "final")
        with self.timed("skip_budget"):
            ok = self.ctx.budget.check(tuned).ok
        return tuned if ok else model
