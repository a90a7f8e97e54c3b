"""The exception hierarchy: every error idap_fx raises on purpose is an ``IdapError``.

Messages name the node, module or argument at fault and say what to do about it.
Which input gives which error, case by case: ``docs/hardening.md``. A
``KeyboardInterrupt`` (or any ``BaseException`` that is not an ``Exception``) is
never wrapped: it propagates as it is, and no output file is left behind.
"""

from __future__ import annotations


class IdapError(Exception):
    """Base class of all documented idap_fx errors.

    Raised as such for bad calibration data (empty, inconsistent shapes, NaN/Inf), NaN/Inf
    or meta-device weights, a ``fine_tune`` callback that raises or reshapes the model, and
    options that make no sense together (no target and no budget, unknown pass).
    """


class OptionError(IdapError, ValueError):
    """An option of ``optimize`` (or the CLI) has a bad value or an unknown name; the message names it."""


class TraceError(IdapError):
    """The model could not be captured as an fx graph.

    Data-dependent control flow, integer or quantized weights, example inputs that fail on
    the model (wrong rank / dtype) or sit on another device, and a forward() that modifies
    its inputs, parameters or buffers in place.
    """


class AnalysisError(IdapError):
    """The dependency analysis could not run (missing shapes, bad example inputs, ...)."""


class PlanError(IdapError, ValueError):
    """A pruning plan is invalid (unknown or frozen group, bad index, empties a group)."""


class BudgetError(IdapError, ValueError):
    """Impossible targets or budgets (target <= 0 or >= 1, negative budget, ...).

    Also a target not reached within the budget (``.result`` then holds the most compressed
    model that stayed within it) and an ``evaluate`` callback that raises or returns NaN.
    """


class DivergedError(IdapError):
    """Training (distillation) reached a non-finite loss."""


class ExportError(IdapError):
    """ONNX export or the output file could not be written (missing or read-only directory, ...)."""


class ParityError(ExportError):
    """The exported ONNX model does not reproduce the torch model within tolerance."""
