"""idap_fx: graph-level structured pruning for PyTorch.

trace -> analyze -> score -> rewrite -> export -> check.
"""

from idap_fx import moved as _moved
from idap_fx.capture.trace import trace
from idap_fx.deploy.latency import LatencyReport, check_latency
from idap_fx.deploy.onnx_export import ExportReport, export_onnx
from idap_fx.deploy.serialize import load, save
from idap_fx.deploy.visualize import to_dot, visualize
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
from idap_fx.graph.analysis import analyze
from idap_fx.graph.dependency import ChannelGroup, DependencyGraph, GroupMember
from idap_fx.method.scoring import score
from idap_fx.optimize import OptimizeResult, optimize
from idap_fx.options import Goal, PruneOptions, Recovery, SkipOptions
from idap_fx.report import OptimizeReport
from idap_fx.rewrite.surgery import mask, prune

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

_moved.install()  # the old module paths (idap_fx.trace, ...) keep importing for one release
