"""idap_fx: graph-level structured pruning for PyTorch.

trace -> analyze -> score -> rewrite -> export -> check.
"""

from idap_fx.analysis import analyze
from idap_fx.dependency import ChannelGroup, DependencyGraph, GroupMember
from idap_fx.errors import (
    AnalysisError,
    BudgetError,
    ExportError,
    IdapError,
    ParityError,
    PlanError,
    TraceError,
)
from idap_fx.optimize import OptimizeReport, OptimizeResult, optimize
from idap_fx.scoring import score
from idap_fx.surgery import mask, prune
from idap_fx.trace import trace
from idap_fx.visualize import to_dot, visualize

__all__ = [
    "AnalysisError",
    "BudgetError",
    "ChannelGroup",
    "DependencyGraph",
    "ExportError",
    "GroupMember",
    "IdapError",
    "OptimizeReport",
    "OptimizeResult",
    "ParityError",
    "PlanError",
    "TraceError",
    "analyze",
    "mask",
    "optimize",
    "prune",
    "score",
    "to_dot",
    "trace",
    "visualize",
]
