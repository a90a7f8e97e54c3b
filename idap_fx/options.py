"""The options of ``optimize``: one small frozen dataclass per concern, each validating itself.

* ``Goal``: what to reach (MAC / parameter / latency targets) within which budget;
* ``Recovery``: how a pruned model is repaired after each step (compensation, distillation,
  the user's ``fine_tune``);
* one options class per pass (``PruneOptions``, ``SkipOptions``), registered with its pass in
  ``idap_fx.passes.PASSES``.

The flat keywords of ``optimize`` (``target_macs=0.5``, ``round_to=8``, ``max_skips=2``, ...)
are these classes' field names (or a field's ``shorthand`` metadata): ``split_shorthands``
routes each one to the class that declares it. The CLI and ``pipeline.run_job`` build the
same objects, and the report stores them (``OptimizeReport.options``).

Adding an option = one field (default + check in ``validate``) in the class it belongs to.
It is then an ``optimize`` keyword and a report entry; add an ``argparse`` line in
``cli.py`` if the command line should expose it, with ``default=<Class>().<field>``.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from idap_fx.errors import BudgetError, IdapError, OptionError

TARGET_TOLERANCE = 0.01
"""A MAC / parameter target counts as reached within 1 % above it (the pass stops there, the report
says so, ``strict`` raises otherwise): stage 1 bisects its last step on the unit count, so it lands
within 1 % whenever one unit is finer than that."""

ALLOCATOR = "auto"
"""Stage 1's default allocator (``idap_fx.method.allocate``), chosen by measurement: docs/architecture.md, "Allocation"."""
MIN_KEEP = 0.25
"""Default floor: every group keeps at least this fraction of its original width (never starved)."""
ROUND_TO = 8
"""Default width alignment, shared by the API, the CLI and the demo: ONNX Runtime's convolutions run
fastest on widths that are multiples of 8 (``bench/latency.py``)."""
COMPENSATION = "auto"
"""What ``compensation=True`` runs after every stage-1 step (``idap_fx.method.compensation``)."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def fraction(name: str, value: float | None) -> float | None:
    """``value`` as a fraction of the original to keep, in (0, 1); ``BudgetError`` naming ``name`` otherwise."""
    if value is None:
        return None
    if not _is_number(value):
        raise BudgetError(f"{name} must be a fraction of the original in (0, 1), got {value!r}")
    if not 0 < value < 1:
        raise BudgetError(
            f"{name}={value} is impossible: give the fraction of the original to keep, in (0, 1)"
        )
    return float(value)


def budget_limit(value: float | None) -> float | None:
    """A budget is None (off) or a number >= 0; ``BudgetError`` otherwise."""
    if value is not None and (not _is_number(value) or value < 0):
        raise BudgetError(f"budget must be None or a number >= 0, got {value!r}")
    return value


def _check(ok: bool, name: str, want: str, value: Any) -> None:
    if not ok:
        raise OptionError(f"{name} must be {want}, got {value!r}")


def _int_at_least(name: str, value: Any, low: int) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    _check(ok, name, f"an integer >= {low}", value)


def _optional_callable(name: str, value: Any) -> None:
    _check(value is None or callable(value), name, "None or a callable", value)


def _bool(name: str, value: Any) -> None:
    _check(isinstance(value, bool), name, "True or False", value)


@dataclass(frozen=True)
class Options:
    """Base of the option classes: validation on construction, JSON-able view for the report."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise an ``IdapError`` naming the argument when a field makes no sense."""

    @classmethod
    def shorthands(cls) -> dict[str, str]:
        """``optimize`` keyword → field name (the field's name unless it declares a ``shorthand``)."""
        return {f.metadata.get("shorthand", f.name): f.name for f in fields(cls)}

    def to_dict(self) -> dict[str, Any]:
        """The fields, callables and data loaders shown by name (for the JSON report)."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return list(value)
    return getattr(value, "name", None) or getattr(value, "__name__", None) or type(value).__name__


@dataclass(frozen=True)
class Goal(Options):
    """What to reach and what it may cost.

    Targets are fractions of the original to keep (``target_macs=0.5``: half the MACs);
    ``target_latency`` is in ms of ONNX Runtime CPU latency. ``budget`` bounds the label-free
    output deviation on held-out calibration batches, pooled over them (``budget_reduce=
    "pooled"``) or per sample (``"max"``, see ``idap_fx.method.budget``), or with ``evaluate(model) ->
    float`` the absolute drop of that metric; None switches it off. With ``strict`` an
    unreached target raises ``BudgetError``.
    """

    target_macs: float | None = None
    target_params: float | None = None
    target_latency: float | None = None
    budget: float | None = 0.05
    budget_reduce: str = "pooled"
    evaluate: Callable[[Any], float] | None = None
    strict: bool = True
    tolerance: float = TARGET_TOLERANCE

    def validate(self) -> None:
        object.__setattr__(self, "target_macs", fraction("target_macs", self.target_macs))
        object.__setattr__(self, "target_params", fraction("target_params", self.target_params))
        if self.target_latency is not None and not (
            _is_number(self.target_latency) and self.target_latency > 0
        ):
            raise BudgetError(
                f"target_latency must be a positive number of milliseconds, got {self.target_latency!r}"
            )
        budget_limit(self.budget)
        _check(
            self.budget_reduce in ("pooled", "max"), "budget_reduce", "'pooled' or 'max'", self.budget_reduce
        )
        _optional_callable("evaluate", self.evaluate)
        _bool("strict", self.strict)
        _check(
            _is_number(self.tolerance) and 0 <= self.tolerance < 1, "tolerance", "in [0, 1)", self.tolerance
        )

    @property
    def has_target(self) -> bool:
        """Whether any target (MACs, parameters or latency) is set."""
        return any(t is not None for t in (self.target_macs, self.target_params, self.target_latency))

    def reached(self, macs: int, params: int, macs0: int, params0: int) -> bool | None:
        """Whether the MAC and parameter targets hold within ``tolerance``; None without such a target."""
        if self.target_macs is None and self.target_params is None:
            return None
        slack = 1 + self.tolerance
        return (self.target_macs is None or macs <= self.target_macs * macs0 * slack) and (
            self.target_params is None or params <= self.target_params * params0 * slack
        )


@dataclass(frozen=True)
class Recovery(Options):
    """How a pruned model is repaired after each accepted change.

    ``compensation`` (stage 1 only; ``True`` = ``COMPENSATION``, or ``"mean"`` / ``"least_squares"`` /
    ``"reconstruct"`` / ``"auto"``, see ``idap_fx.method.compensation``) folds what the removed channels carried
    into the next layers (``reconstruct`` then re-fits the layers after them); it runs first, then ``fine_tune(model, teacher)`` if given, else
    distillation on ``train_loader`` (``distill_steps`` batches; all of it when None).
    """

    compensation: bool | str = True
    fine_tune: Callable[[Any, Any], Any] | None = None
    train_loader: Iterable[Any] | None = None
    distill_steps: int | None = None

    def validate(self) -> None:
        from idap_fx.method.compensation import MODES

        _check(
            isinstance(self.compensation, bool)
            or (isinstance(self.compensation, str) and self.compensation in MODES),
            "compensation",
            f"True, False or one of {list(MODES)}",
            self.compensation,
        )
        _optional_callable("fine_tune", self.fine_tune)
        loader = self.train_loader
        _check(
            loader is None or (isinstance(loader, Iterable) and not isinstance(loader, (str, bytes))),
            "train_loader",
            "None or an iterable of batches",
            loader,
        )
        if self.distill_steps is not None:
            _int_at_least("distill_steps", self.distill_steps, 1)

    @property
    def compensation_mode(self) -> str:
        """The compensation that runs (``True`` means the default, ``COMPENSATION``)."""
        return COMPENSATION if self.compensation is True else str(self.compensation)

    @property
    def trains(self) -> bool:
        """Whether recovery trains (a ``fine_tune`` callback or distillation)."""
        return self.fine_tune is not None or self.train_loader is not None


@dataclass(frozen=True)
class PassOptions(Options):
    """Base of per-pass options; ``pass_name`` links the class to its pass in ``idap_fx.passes.PASSES``."""

    pass_name: ClassVar[str] = ""

    def validate_with(self, goal: Goal) -> None:
        """Checks that need the goal too (called by ``optimize``)."""


@dataclass(frozen=True)
class PruneOptions(PassOptions):
    """Stage 1 (``prune_channels``): importance, schedule, allocator and floors.

    ``importance``: ``divergence`` (default), ``l1``, ``bn_scale``, ``taylor`` (needs
    ``loss_fn(model, batch) -> loss``), ``random`` or an ``Importance`` object. A group keeps
    ≥ ``min_channels`` channels, ``min_keep`` of its original width and a multiple of ``round_to``
    units; ``max_prune_ratio`` caps what a group loses (a float, or module path / type name →
    ratio: a group takes the tightest cap of its modules). ``allocator`` (``auto``: the best of
    ``group``, ``cost`` and ``sensitivity`` after a short distillation probe; or one of those, or
    ``global``) decides which units go (``idap_fx.method.allocate``). A step that breaks
    the budget is retried at half size ``backtracks`` times. ``ignored_layers`` (module paths,
    their prefixes, module types or type names) keep every group their parameters belong to.
    ``query_heads``: under grouped-query attention (``repeat_kv``), ``True`` removes query heads one by
    one and keeps every key / value head (``idap_fx.rewrite.repeat_kv``); ``False`` removes a key /
    value head with all its query heads; ``None`` (default) does the first only where one key / value
    head serves every query head (multi-query attention, where the second could remove no head).
    """

    pass_name: ClassVar[str] = "prune_channels"
    importance: Any = "divergence"
    schedule: Any = None
    min_channels: int = 1
    round_to: int = ROUND_TO
    allocator: str = ALLOCATOR
    min_keep: float = MIN_KEEP
    max_prune_ratio: float | Mapping[str, float] | None = None
    prune_inexact: bool = False
    loss_fn: Callable[[Any, Any], Any] | None = None
    backtracks: int = 2
    ignored_layers: tuple[Any, ...] = ()
    query_heads: bool | None = None

    def validate(self) -> None:
        from idap_fx.method.schedule import get_schedule
        from idap_fx.method.scoring import get_importance

        get_importance(self.importance)  # unknown names raise here, before any work
        get_schedule(self.schedule)
        _int_at_least("min_channels", self.min_channels, 1)
        _int_at_least("round_to", self.round_to, 1)
        from idap_fx.method.allocate import ALLOCATORS, Floors

        if self.allocator not in ALLOCATORS:
            raise OptionError(f"allocator must be one of {list(ALLOCATORS)}, got {self.allocator!r}")
        try:
            Floors(self.min_keep, self.min_channels, self.round_to, self.max_prune_ratio)
        except IdapError as exc:
            raise OptionError(str(exc)) from None
        _bool("prune_inexact", self.prune_inexact)
        if self.query_heads is not None:
            _bool("query_heads", self.query_heads)
        _optional_callable("loss_fn", self.loss_fn)
        _int_at_least("backtracks", self.backtracks, 0)
        bad = [e for e in self.ignored_layers if not isinstance(e, (str, type))]
        _check(isinstance(self.ignored_layers, (tuple, list)) and not bad, "ignored_layers",
               "module names or types", bad or self.ignored_layers)  # fmt: skip

    def validate_with(self, goal: Goal) -> None:
        if goal.budget is None and not goal.has_target:
            raise OptionError(
                "nothing to aim for: give a target (target_macs / target_params / target_latency) or a budget"
            )


SKIP_KINDS = ("residual", "identity", "projection")


@dataclass(frozen=True)
class SkipOptions(PassOptions):
    """Stage 2 (``skip_layers``): at most ``max_skips`` removals, each within ``tau_layer``.

    ``kinds`` selects the candidate kinds; ``projection=True`` (keyword ``skip_projection``)
    adds (c), the fitted 1×1 conv / linear replacement of channel-changing chains. ``max_units``
    is the longest chain (in conv / linear / attention layers) tried as one candidate.
    """

    pass_name: ClassVar[str] = "skip_layers"
    max_skips: int = 5
    tau_layer: float | None = None
    projection: bool = field(default=False, metadata={"shorthand": "skip_projection"})
    kinds: tuple[str, ...] = ("residual", "identity")
    max_units: int = 2

    def validate(self) -> None:
        _int_at_least("max_skips", self.max_skips, 0)
        _check(
            self.tau_layer is None or _is_number(self.tau_layer),
            "tau_layer",
            "None or a number",
            self.tau_layer,
        )
        _bool("projection", self.projection)
        bad = [k for k in self.kinds if k not in SKIP_KINDS]
        _check(isinstance(self.kinds, tuple) and not bad, "kinds", f"a tuple of {SKIP_KINDS}", self.kinds)
        _int_at_least("max_units", self.max_units, 1)

    @property
    def candidate_kinds(self) -> tuple[str, ...]:
        """``kinds``, with ``"projection"`` added when ``projection`` is set."""
        return (
            self.kinds + ("projection",) if self.projection and "projection" not in self.kinds else self.kinds
        )


def split_shorthands(
    shorthands: Mapping[str, Any], classes: Iterable[type[Options]]
) -> dict[type[Options], dict[str, Any]]:
    """Route each flat keyword to the options class that declares it (keyed by field name).

    An unknown keyword raises ``OptionError`` naming it and the closest known one.
    """
    table = {short: (cls, name) for cls in classes for short, name in cls.shorthands().items()}
    out: dict[type[Options], dict[str, Any]] = {}
    for key, value in shorthands.items():
        if key not in table:
            close = difflib.get_close_matches(key, table, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise OptionError(f"optimize got an unknown option {key!r}{hint}")
        cls, name = table[key]
        out.setdefault(cls, {})[name] = value
    return out


def build(cls: type[Options], given: Options | None, values: Mapping[str, Any], arg: str) -> Options:
    """``given`` (an options object passed as ``arg``) or ``cls`` built from the flat keywords, not both."""
    if given is None:
        return cls(**values)
    if not isinstance(given, cls):
        raise OptionError(f"{arg} must be a {cls.__name__}, got {type(given).__name__}")
    if values:
        raise OptionError(f"give {', '.join(sorted(values))} inside {arg}= or as keywords, not both")
    return given
