"""Shapes on every node: run a GraphModule once on example inputs and record what each node produced.

Used by ``trace`` (capture), ``exported.from_exported`` (``torch.export`` programs) and every
rewrite that must re-record shapes; it depends on nothing else of idap_fx, so both capture
paths import it without importing each other.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from idap_fx.errors import TraceError


def as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    """Example inputs as a tuple (one tensor, or a tuple / list of them); ``TraceError`` otherwise."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise TraceError(
        f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}"
    )


def _describe(n: fx.Node) -> str:
    where = n.target if n.op == "call_module" else getattr(n.target, "__name__", n.target)
    return f"node {n.name!r} ({n.op} {where})"


class _NamedShapeProp(fx.Interpreter):
    """Shape propagation (as ``ShapeProp``) whose errors name the node, the example inputs and the cause.

    With ``watch``, it also refuses a node that modifies an example input, a parameter or a
    buffer in place (tensor version counters tell, views included): pruning runs the model
    many times on the caller's calibration batches and on copies of its weights.
    """

    def __init__(self, gm: fx.GraphModule, inputs: tuple[Any, ...], watch: bool) -> None:
        super().__init__(gm)
        self.extra_traceback = False  # the TraceError names the node already
        placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        self.inputs = ", ".join(
            f"{name!r}: {tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else f"{name!r}: {x!r}"
            for name, x in zip(placeholders, inputs, strict=False)
        )
        self.watched: list[tuple[str, torch.Tensor]] = []
        if watch:
            self.watched += [
                (f"example input {name!r}", x)
                for name, x in zip(placeholders, inputs, strict=False)
                if isinstance(x, torch.Tensor)
            ]
            self.watched += [(f"parameter {k!r}", t) for k, t in gm.named_parameters()]
            self.watched += [(f"buffer {k!r}", t) for k, t in gm.named_buffers()]

    def run_node(self, n: fx.Node) -> Any:
        versions = [t._version for _, t in self.watched]
        try:
            result = super().run_node(n)
        except TraceError:
            raise
        except Exception as exc:
            raise TraceError(
                f"{_describe(n)} failed on the example inputs ({self.inputs}); check their rank, "
                f"shape and dtype: {type(exc).__name__}: {exc}"
            ) from exc
        for (what, t), v in zip(self.watched, versions, strict=True):
            if t._version != v:
                raise TraceError(
                    f"{_describe(n)} modifies {what} in place. idap_fx runs the model many times on "
                    "the calibration batches and on copies of the weights, so in-place updates of "
                    "inputs or model state are refused: use the out-of-place op (y = x.mul(2), "
                    "inplace=False), or guard a state update (counter, running statistic) with "
                    "`if self.training:` (idap_fx traces in eval mode)"
                )
        found = False

        def tensor_meta(value: Any) -> Any:
            nonlocal found
            if isinstance(value, torch.Tensor):
                found = True
                return _extract_tensor_metadata(value)
            return value

        meta = map_aggregate(result, tensor_meta)
        if found:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result


def record_shapes(gm: fx.GraphModule, example_inputs: Any, *, watch: bool = False) -> None:
    """Run ``gm`` once on ``example_inputs``, storing shape/dtype in every node's meta.

    ``watch`` refuses in-place updates of the inputs, parameters or buffers (see ``trace``).
    """
    inputs = as_tuple(example_inputs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    required = sum(1 for n in placeholders if not n.args)  # the rest have defaults (optional arguments)
    if not required <= len(inputs) <= len(placeholders):
        takes = f"{required} to {len(placeholders)}" if required < len(placeholders) else f"{required}"
        raise TraceError(f"the model takes {takes} input(s), example_inputs has {len(inputs)}")
    with torch.no_grad():
        _NamedShapeProp(gm, inputs, watch).run(*inputs)
