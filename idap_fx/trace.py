"""Capture a model as a ``torch.fx.GraphModule`` with tensor shapes on every node.

The caller's model is deep-copied first (a GraphModule shares its root's submodules,
so tracing in place would let later rewrites or fine-tuning touch the caller's
weights), put in eval mode, traced, and run once through ``ShapeProp``.
"""

from __future__ import annotations

import copy
import traceback
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from idap_fx.errors import TraceError


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise TraceError(
        f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}"
    )


class _RecordingTracer(fx.Tracer):
    """An fx tracer that remembers which module it was inside when tracing failed."""

    def __init__(self, leaf_modules: Sequence[type] = ()) -> None:
        super().__init__()
        self.leaf_types = tuple(leaf_modules)
        self.stack: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        self.stack.append(self.path_of_module(m))
        result = super().call_module(m, forward, args, kwargs)
        self.stack.pop()
        return result


def _user_frame(exc: BaseException) -> str:
    """The innermost stack frame outside torch: where the offending Python construct is."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename]
    if not frames:
        return "unknown location"
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: {f.line}"


def _check_model(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            raise TraceError(
                f"parameter {name!r} has dtype {p.dtype}: idap_fx prunes floating-point models "
                "(prune before quantizing)"
            )


class _NamedShapeProp(ShapeProp):
    """ShapeProp whose errors name the node that failed."""

    def run_node(self, n: fx.Node) -> Any:
        try:
            return super().run_node(n)
        except TraceError:
            raise
        except Exception as exc:
            where = n.target if n.op == "call_module" else getattr(n.target, "__name__", n.target)
            raise TraceError(
                f"node {n.name!r} ({n.op} {where}) failed on the example inputs: {exc}. "
                "Check the example inputs' rank, shape and dtype."
            ) from exc


def record_shapes(gm: fx.GraphModule, example_inputs: Any) -> None:
    """Run ``gm`` once on ``example_inputs``, storing shape/dtype in every node's meta."""
    inputs = _as_tuple(example_inputs)
    n_placeholders = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    if len(inputs) != n_placeholders:
        raise TraceError(f"the model takes {n_placeholders} input(s), example_inputs has {len(inputs)}")
    with torch.no_grad():
        _NamedShapeProp(gm).propagate(*inputs)


def trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Sequence[type] = (),
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Trace ``model`` (an ``nn.Module`` or a ``GraphModule``) into a new GraphModule with shapes.

    ``leaf_modules`` are module types kept as opaque calls (their channels are frozen);
    ``concrete_args`` pins Python arguments that steer control flow.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"trace() takes an nn.Module or a GraphModule, got {type(model).__name__}")
    _check_model(model)
    inputs = _as_tuple(example_inputs)
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise TraceError(f"example input {i} is a {type(x).__name__}, not a tensor")
    copied = copy.deepcopy(model).eval()
    if isinstance(copied, fx.GraphModule):
        gm = copied
    else:
        tracer = _RecordingTracer(leaf_modules)
        try:
            graph = tracer.trace(copied, concrete_args=concrete_args)
        except Exception as exc:
            inside = tracer.stack[-1] if tracer.stack else "<root>"
            raise TraceError(
                f"torch.fx cannot trace {type(model).__name__}: inside module {inside!r} "
                f"({type(copied.get_submodule(inside)).__name__ if inside != '<root>' else type(model).__name__}) "
                f"at {_user_frame(exc)}: {exc}. Hint: make that module a leaf "
                "(trace(..., leaf_modules=[ItsClass])) or fix the branch with concrete_args."
            ) from exc
        gm = fx.GraphModule(copied, graph, class_name=type(model).__name__)
    record_shapes(gm, inputs)
    return gm
