"""idap_fx: graph-level structured pruning for PyTorch.

trace -> analyze -> score -> rewrite -> export -> check.
"""

from idap_fx.analysis import analyze
from idap_fx.dependency import ChannelGroup, DependencyGraph, GroupMember
from idap_fx.errors import (
    AnalysisError,
    BudgetError,
    DivergedError,
    ExportError,
    IdapError,
    OptionError,
    ParityError,
    PlanError,
    TraceError,
)
from idap_fx.latency import LatencyReport, check_latency
from idap_fx.onnx_export import ExportReport, export_onnx
from idap_fx.optimize import OptimizeResult, optimize
from idap_fx.options import Goal, PruneOptions, Recovery, SkipOptions
from idap_fx.report import OptimizeReport
from idap_fx.scoring import score
from idap_fx.serialize import load, save
from idap_fx.surgery import mask, prune
from idap_fx.trace import trace
from idap_fx.visualize import to_dot, visualize

__all__ = [
    "AnalysisError",
    "BudgetError",
    "DivergedError",
    "ChannelGroup",
    "DependencyGraph",
    "ExportError",
    "ExportReport",
    "Goal",
    "GroupMember",
    "IdapError",
    "LatencyReport",
    "OptimizeReport",
    "OptimizeResult",
    "OptionError",
    "ParityError",
    "PlanError",
    "PruneOptions",
    "Recovery",
    "SkipOptions",
    "TraceError",
    "analyze",
    "check_latency",
    "export_onnx",
    "load",
    "mask",
    "optimize",
    "prune",
    "save",
    "score",
    "to_dot",
    "trace",
    "visualize",
]
