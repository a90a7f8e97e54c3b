"""``OptimizeReport``: what ``optimize`` did and achieved, as data, JSON and Markdown."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


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
    options: dict[str, Any] = field(default_factory=dict)  # the Goal, Recovery and pass options of the run

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
        return asdict(self) | {"macs_ratio": self.macs_ratio, "params_ratio": self.params_ratio}

    def to_json(self) -> str:
        """The report as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, default=str)

    def to_markdown(self) -> str:
        """A short human-readable summary."""
        lines = [
            "# idap_fx optimize report",
            "",
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
        if self.frozen_ops:
            lines += [
                "",
                f"Ops the analyzer does not understand (their channels were frozen): {len(self.frozen_ops)}",
            ]
            lines += [f"- `{k}`: {v}" for k, v in list(self.frozen_ops.items())[:20]]
        lines += [f"- note: {n}" for n in self.notes]
        return "\n".join(lines) + "\n"
