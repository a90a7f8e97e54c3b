"""``torch.export`` graphs as input: an ``ExportedProgram`` (or its ATen GraphModule) to prune.

``torch.export`` is where PyTorch's graph capture is going, and the way to capture
models that ``torch.fx`` cannot trace (transformers 5 removed its fx tracer). The
program is functionalised (``run_decompositions({})``: in-place ops become their
functional forms, composite ops such as ``conv2d`` and ``linear`` stay) and unlifted
(``.module()``: parameters are read with ``get_attr``); shapes are recorded by running
it once. The ATen rules in ``idap_fx.graph.ops.aten`` then give the same groups as the fx path.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from idap_fx.capture.constants import fold_constants
from idap_fx.capture.shapes import record_shapes
from idap_fx.errors import TraceError


def _flat_inputs(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(pytree.tree_leaves(example_inputs))


def _constants_as_buffers(gm: fx.GraphModule) -> None:
    """Tensors the program lifted as plain attributes become buffers, as a copy of the GraphModule makes them."""
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        owner_name, _, attr = node.target.rpartition(".")
        owner = gm.get_submodule(owner_name)
        value = getattr(owner, attr)
        if isinstance(value, torch.Tensor) and attr not in owner._parameters and attr not in owner._buffers:
            delattr(owner, attr)
            owner.register_buffer(attr, value)


def _views_as_reshapes(gm: fx.GraphModule) -> None:
    """``aten.view`` becomes ``aten.reshape`` (same values; a copy only where a view cannot be had).

    An exported ``view`` after a ``transpose`` is valid only for the strides seen at export time: after
    pruning, an attention whose value heads lost channels returns another layout and the view failed
    ("view size is not compatible with input tensor's size and stride"). The graph is functional, so no
    op depends on the aliasing.
    """
    views = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.view.default]
    for node in views:
        node.target = torch.ops.aten.reshape.default
    if views:
        gm.recompile()


def from_exported(program: Any, example_inputs: Any = None) -> fx.GraphModule:
    """A new GraphModule with shapes from a ``torch.export.ExportedProgram`` or its ``.module()``.

    ``example_inputs`` (a tensor, a tuple, or ``(args, kwargs)`` as ``torch.export``
    takes them) default to the program's own example inputs. The result is called like
    the exported model (same arguments, same output structure).
    """
    if isinstance(program, torch.export.ExportedProgram):
        try:
            gm = program.run_decompositions({}).module()
        except Exception as exc:
            raise TraceError(f"cannot functionalise the exported program: {exc}") from exc
        if example_inputs is None:
            example_inputs = program.example_inputs
    elif isinstance(program, fx.GraphModule):
        gm = copy.deepcopy(program)
    else:
        raise TraceError(
            f"from_exported() takes a torch.export.ExportedProgram or its GraphModule, got {type(program).__name__}"
        )
    if example_inputs is None:
        raise TraceError("pass example_inputs: the GraphModule does not carry its export's example inputs")
    inputs = _flat_inputs(example_inputs)
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise TraceError(f"example input {i} is a {type(x).__name__}, not a tensor")
    _constants_as_buffers(gm)
    fold_constants(gm)
    _views_as_reshapes(gm)
    record_shapes(gm, inputs)
    for node in gm.graph.nodes:
        if (
            node.op == "output"
        ):  # the flattened output tuple's shapes are its producers'; prune() re-derives none
            node.meta.pop("tensor_meta", None)
    return gm
