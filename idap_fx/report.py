"""``OptimizeReport``: what ``optimize`` did and achieved, as data, JSON and Markdown."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class OptimizeReport:
    """What ``optimize`` did and achieved; every number is measured on the models themselves."""

    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    target_macs: float | None
    target_params: float | None
    target_reached: bool | None
    budget_kind: str
    budget_limit: float | None
    budget_consumed: float
    quality_before: float
    quality_after: float
    importance: str
    schedule: list[float]
    steps: list[dict[str, Any]]
    removed_layers: list[dict[str, Any]]
    layer_trials: list[dict[str, Any]]
    stop_reason: str
    timings: dict[str, float]
    frozen_ops: dict[str, str]
    notes: list[str] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)  # the Goal, Recovery and pass options of the run
    recovery: list[dict[str, Any]] = field(default_factory=list)

    def recovery_total(self) -> dict[str, Any] | None:
        """All recoveries together: their summed held-out gain (before − after, lower measure is better) and steps."""
        if not self.recovery:
            return None
        measured = [r for r in self.recovery if r["before"] is not None and r["after"] is not None]
        return {
            "recoveries": len(self.recovery),
            "gain": sum(r["before"] - r["after"] for r in measured) if measured else None,
            "steps": sum(r["steps"] or 0 for r in self.recovery),
            "reverted": sum(r["kept_step"] == 0 for r in self.recovery),
            "stopped_early": sum(r["stop"].startswith("no held-out") for r in self.recovery),
        }

    @property
    def macs_ratio(self) -> float:
        """MACs after / before."""
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    @property
    def params_ratio(self) -> float:
        """Parameters after / before."""
        return self.params_after / self.params_before if self.params_before else 1.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (ratios included)."""
        return asdict(self) | {
            "macs_ratio": self.macs_ratio,
            "params_ratio": self.params_ratio,
            "recovery_total": self.recovery_total(),
        }

    def to_json(self) -> str:
        """The report as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, default=str)

    def to_markdown(self) -> str:
        """A short human-readable summary."""
        lines = ["# idap_fx optimize report", ""]
        lines += [f"- **WARNING: {w}**" for w in self.warnings] + ([""] if self.warnings else [])
        lines += [
            "| | before | after | ratio |",
            "|---|---|---|---|",
            f"| MACs | {self.macs_before:,} | {self.macs_after:,} | {self.macs_ratio:.3f} |",
            f"| params | {self.params_before:,} | {self.params_after:,} | {self.params_ratio:.3f} |",
            f"| quality ({self.budget_kind}) | {self.quality_before:.4g} | {self.quality_after:.4g} | |",
            "",
            f"- importance: `{self.importance}`; stop: {self.stop_reason}; target reached: {self.target_reached}",
            f"- budget: {self.budget_kind}, limit {self.budget_limit}, consumed {self.budget_consumed:.4g}",
            f"- schedule ρ_t used: {', '.join(f'{r:.3f}' for r in self.schedule)}",
            f"- wall time per phase (s): {', '.join(f'{k} {v:.2f}' for k, v in self.timings.items())}",
            "",
            "| step | ρ | units removed | groups | MACs | budget used | accepted | note |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s in self.steps:
            lines.append(
                f"| {s['step']} | {s['rho']:.3f} | {s['units_removed']} | {len(s['groups'])} | {s['macs']:,} "
                f"| {s['budget_consumed']:.4g} | {s['accepted']} | {s['note']} |"
            )
        if self.layers:
            lines += ["", *layer_table_markdown(self.layers)]
        if self.layer_trials:
            lines += [
                "",
                "| layer (stage 2) | kind | score | quality delta | removed |",
                "|---|---|---|---|---|",
            ]
            names = {r["name"] for r in self.removed_layers}
            lines += [
                f"| {r['name']} | {r.get('kind', '')} | {r['score']:.4g} | {r['delta']:.4g} | {r['name'] in names} |"
                for r in self.layer_trials
            ]
        lines += self._recovery_markdown()
        if self.frozen_ops:
            lines += [
                "",
                f"Ops the analyzer does not understand (their channels were frozen): {len(self.frozen_ops)}",
            ]
            lines += [f"- `{k}`: {v}" for k, v in list(self.frozen_ops.items())[:20]]
        lines += [f"- note: {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def _recovery_markdown(self) -> list[str]:
        total = self.recovery_total()
        if total is None:
            return []
        fmt = lambda v: "–" if v is None else f"{v:.4g}"  # noqa: E731
        measure = (
            "drop of evaluate"
            if self.budget_kind == "evaluate"
            else "distill: its loss to the step's teacher; fine_tune: output deviation from the original"
        )
        lines = [
            "",
            f"Recovery, measured on held-out batches ({measure}, lower is better; the best state is kept):",
            "",
            "| pass | at | method | before | after | steps | kept step | stop |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['pass']} | {r['at']} | {r['method']} | {fmt(r['before'])} | {fmt(r['after'])} "
            f"| {r['steps'] if r['steps'] is not None else '–'} | {fmt(r['kept_step'])} | {r['stop']} |"
            for r in self.recovery
        ]
        lines.append(
            f"- recovery in total: {total['recoveries']} runs, {total['steps']} training steps, held-out gain "
            f"{fmt(total['gain'])}, {total['reverted']} reverted to the unrecovered weights, "
            f"{total['stopped_early']} stopped early"
        )
        return lines


@dataclass
class LayerChange:
    """One layer of the plan: its output width before → after and its share of the original MACs."""

    module: str
    kind: str
    width_before: int
    width_after: int
    macs_before: int | None
    macs_after: int | None
    macs_share: float | None  # of the original model's MACs, before pruning

    @property
    def removed_share(self) -> float:
        """Fraction of the layer's output channels removed."""
        return 1 - self.width_after / self.width_before if self.width_before else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (removed share included)."""
        return asdict(self) | {"removed_share": self.removed_share}


def layer_table_markdown(layers: list[dict[str, Any]]) -> list[str]:
    """The per-layer table (module, width before → after, share removed, MACs share) as Markdown lines."""
    lines = [
        "| layer | kind | width before → after | removed | MACs share (original) |",
        "|---|---|---|---|---|",
    ]
    for r in layers:
        share = "" if r["macs_share"] is None else f"{100 * r['macs_share']:.1f} %"
        lines.append(
            f"| {r['module']} | {r['kind']} | {r['width_before']} → {r['width_after']} "
            f"| {100 * r['removed_share']:.1f} % | {share} |"
        )
    return lines


def _module_macs(model: nn.Module, inputs: tuple[Any, ...]) -> dict[str, int]:
    """MACs per module path, the whole model under "" (meta forward; empty when that cannot run)."""
    meta = {
        k: torch.empty_like(v, device="meta")
        for k, v in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items()
    }
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            functional_call(
                model, meta, tree_map(lambda v: v.to("meta") if torch.is_tensor(v) else v, inputs)
            )
    except Exception:  # graphs that build real tensors (arange, ...) cannot run on meta: no per-layer MACs
        return {}
    out = {}
    for key, ops in counter.get_flop_counts().items():
        _, dot, path = key.partition(".")
        if dot or key == "Global":
            out[path] = sum(ops.values()) // 2
    return out


def _width(m: nn.Module) -> int | None:
    for attr in ("out_channels", "out_features", "num_embeddings"):
        if isinstance(getattr(m, attr, None), int):
            return getattr(m, attr)
    w = m._parameters.get("weight")
    return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.dim() >= 2 else None


def layer_changes(original: nn.Module, model: nn.Module, inputs: tuple[Any, ...]) -> list[LayerChange]:
    """Every weight layer (conv, linear, embedding) of ``original`` with its width in ``model``.

    Layers are matched by module path (the rewrite keeps paths); a layer that stage 2
    removed has width 0 after.
    """
    macs0, macs1 = _module_macs(original, inputs), _module_macs(model, inputs)
    total = macs0.get("")
    after = dict(model.named_modules())
    rows = []
    for name, m in original.named_modules():
        before = _width(m)
        if not name or before is None:
            continue
        new = after.get(name)
        width = _width(new) if new is not None else 0
        rows.append(
            LayerChange(
                name, type(m).__name__, before, width if width is not None else before,
                macs0.get(name), macs1.get(name) if new is not None else 0,
                macs0[name] / total if total and name in macs0 else None,
            )
        )  # fmt: skip
    return rows
