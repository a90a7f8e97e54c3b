"""The exception hierarchy: every error idap_fx raises on purpose is an ``IdapError``.

Messages name the node, module or argument at fault and say what to do about it.
"""

from __future__ import annotations


class IdapError(Exception):
    """Base class of all documented idap_fx errors."""


class TraceError(IdapError):
    """The model could not be captured as an fx graph (data-dependent control flow, ...)."""


class AnalysisError(IdapError):
    """The dependency analysis could not run (missing shapes, bad example inputs, ...)."""


class PlanError(IdapError, ValueError):
    """A pruning plan is invalid (unknown or frozen group, bad index, empties a group)."""


class BudgetError(IdapError, ValueError):
    """Impossible targets or budgets (target <= 0 or >= 1, negative budget, ...)."""


class ExportError(IdapError):
    """ONNX export or the output file could not be written."""


class ParityError(ExportError):
    """The exported ONNX model does not reproduce the torch model within tolerance."""
