"""The base of idap_fx's passes: shared context in, typed record out, checks on what is returned.

A pass is a ``torch.fx.passes.infra`` ``PassBase`` (``requires`` / ``call`` / ``ensures`` →
``PassResult``) with three changes that torch's ``PassBase.__call__`` / ``PassManager`` do not
give: ``ensures`` checks the graph the pass *returns* (these passes return a new module, not the
input edited in place); what the pass did is a typed ``PassRecord`` (``self.record``), not
attributes read back with ``getattr``; errors propagate unchanged (``run_passes`` is a plain
loop, where ``PassManager`` wraps every failure in a bare ``Exception``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from idap_fx.errors import AnalysisError
from idap_fx.method.recovery import distill, held_out_loss, run_fine_tune
from idap_fx.options import Goal, PassOptions, Recovery


def _no_progress(it: Any, **kw: Any) -> Any:
    return it


@dataclass
class PassContext:
    """What every pass shares besides the model, filled once by ``optimize``.

    ``calibration`` holds the scoring batches (the budget's held-out ones live in ``budget``);
    ``macs0`` / ``params0`` are the original model's, counted once; ``stop_check(model)``
    returns a reason to stop early (a latency target) or None.
    """

    example_inputs: tuple[Any, ...]
    calibration: list[Any]
    budget: Any  # idap_fx.method.budget.Budget
    goal: Goal = field(default_factory=Goal)
    recovery: Recovery = field(default_factory=Recovery)
    macs0: int = 0
    params0: int = 0
    seed: int = 0
    progress: Callable[..., Any] = _no_progress
    stop_check: Callable[[fx.GraphModule], str | None] | None = None
    on_step: Callable[[dict[str, Any], int], None] | None = None  # each step record and the planned total
    recorder: Any = (
        None  # idap_fx.curve.Snapshots (keep_snapshots=True): on_prune / on_skip per accepted step
    )


@dataclass
class PassRecord:
    """What one pass did, for the report: stage-1 steps and ρ_t, stage-2 removals and trials, recoveries."""

    name: str  # the pass class's name, as the report's stop_reason shows it
    steps: list[dict[str, Any]] = field(default_factory=list)
    schedule: list[float] = field(default_factory=list)
    removed: list[dict[str, Any]] = field(default_factory=list)
    trials: list[dict[str, Any]] = field(default_factory=list)
    recovery: list[dict[str, Any]] = field(
        default_factory=list
    )  # one RecoveryRecord (as a dict) per recovery
    stop_reason: str = ""
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    frozen_ops: dict[str, str] = field(default_factory=dict)
    importance: str = ""
    modified: bool = False


class IdapPass(PassBase):
    """A pass run on a shape-annotated GraphModule; subclasses set ``name`` and ``options_class``."""

    name: ClassVar[str] = ""
    options_class: ClassVar[type[PassOptions]] = PassOptions

    def __init__(self, ctx: PassContext, options: PassOptions | None = None) -> None:
        super().__init__()
        self.ctx = ctx
        self.options = options if options is not None else self.options_class()
        self.record = PassRecord(type(self).__name__)

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Add the wall time of the ``with`` body to ``record.timings[phase]``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            timings = self.record.timings
            timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - t0

    def train_recovery(
        self, model: fx.GraphModule, teacher: fx.GraphModule, at: Any
    ) -> tuple[fx.GraphModule, str]:
        """``Recovery``'s training (the user's callback, else distillation), guarded on held-out data:
        the user's ``evaluate`` when given, else for distillation its own loss on the budget's
        held-out batches, for a callback the budget's output deviation. Each run is recorded in
        ``record.recovery`` (``at``: where in the pass)."""
        rec, measure = self.ctx.recovery, self.ctx.budget.recovery_measure
        record, note = None, ""
        if rec.fine_tune is not None:
            model, record = run_fine_tune(rec.fine_tune, model, teacher, measure)
            note = "fine_tune callback"
        elif rec.train_loader is not None:
            budget = self.ctx.budget
            if measure is not None and budget.evaluate is None and budget.holdout:
                measure = held_out_loss(teacher, budget.holdout)  # watch the loss distillation optimises
            record = distill(
                model, teacher, rec.train_loader, steps=rec.distill_steps, measure=measure, progress=self.ctx.progress
            )  # fmt: skip
            note = "distilled"
        if record is not None:
            self.record.recovery.append({"pass": self.name, "at": at} | asdict(record))
        return model, note

    def requires(self, graph_module: fx.GraphModule) -> None:
        """The input carries shapes (``idap_fx.trace`` / ``record_shapes`` put them there)."""
        if not any("tensor_meta" in n.meta for n in graph_module.graph.nodes if n.op == "placeholder"):
            raise AnalysisError(f"{self.name} needs shapes on the graph: build it with idap_fx.trace")

    def ensures(self, graph_module: fx.GraphModule) -> None:
        """The returned graph is well formed."""
        graph_module.graph.lint()

    def __call__(self, graph_module: fx.GraphModule) -> PassResult:
        self.requires(graph_module)
        result = self.call(graph_module)
        self.ensures(result.graph_module)
        self.record.modified = result.modified
        return result


def run_passes(passes: Sequence[IdapPass], gm: fx.GraphModule) -> tuple[fx.GraphModule, list[PassRecord]]:
    """Run ``passes`` in order, each on the previous one's result; errors propagate as raised."""
    for p in passes:
        gm = p(gm).graph_module
    return gm, [p.record for p in passes]
