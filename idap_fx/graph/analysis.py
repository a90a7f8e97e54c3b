"""The dependency analysis: an ``fx.Interpreter`` that runs channel layouts instead of tensors.

Each node's value is its ``Layout`` (or a tuple of them, or ``Dynamic`` for sizes and
other non-tensor values). The op registry says how layouts flow; anything the registry
does not know is a boundary that freezes the channels it touches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import fx

from idap_fx.errors import AnalysisError
from idap_fx.graph import ops  # noqa: F401  (fills the registry)
from idap_fx.graph.dependency import Coupling, DependencyGraph
from idap_fx.graph.layout import Axis, Dynamic, Layout, all_ids, dim_ids, layouts_in
from idap_fx.graph.ops.registry import is_tensor_meta, lookup, meta_shape


class RuleContext:
    """What a rule may read (input layouts, shapes, modules) and record (couplings)."""

    def __init__(self, gm: fx.GraphModule, coupling: Coupling, env: dict[fx.Node, Any]) -> None:
        self.gm = gm
        self.coupling = coupling
        self.env = env

    def value(self, arg: Any) -> Any:
        """The analysis value of an argument: a Layout, Dynamic, tuple, or the constant itself."""
        if isinstance(arg, fx.Node):
            return self.env[arg]
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.value(a) for a in arg)
        if isinstance(arg, dict):  # e.g. a Hugging Face model's output dict
            return {k: self.value(a) for k, a in arg.items()}
        return arg

    def layout(self, arg: Any) -> Layout:
        """The layout of a tensor argument (raises if it is not a tensor)."""
        val = self.value(arg)
        if not isinstance(val, Layout):
            raise TypeError(f"expected a tensor argument, got {type(val).__name__}")
        return val

    def shape(self, node: fx.Node) -> tuple[int, ...]:
        """The static shape of a tensor node."""
        shape = meta_shape(node)
        if shape is None:
            raise TypeError(f"node {node.name} has no recorded tensor shape")
        return shape

    def module(self, node: fx.Node) -> torch.nn.Module:
        """The submodule a ``call_module`` node calls."""
        return self.gm.get_submodule(node.target)

    def param(self, node: fx.Node, attr: str, dim: int, role: str, ids: np.ndarray) -> None:
        """Record that ``<module of node>.<attr>`` holds ``ids`` along ``dim`` (skipped if absent)."""
        if node.op != "call_module":
            return
        path, _, leaf = f"{node.target}.{attr}".rpartition(".")
        tensor = getattr(self.gm.get_submodule(path), leaf, None)
        if isinstance(tensor, torch.Tensor):
            self.coupling.member(node.name, f"{path}.{leaf}", id(tensor), dim, role, ids)

    def freeze_layout(self, layout: Any, reason: str) -> None:
        """Freeze every channel in a value (layouts nested in tuples too)."""
        for lay in layouts_in(layout):
            self.coupling.freeze(all_ids(lay), reason)

    def frozen_fresh(self, node: fx.Node, shape: Sequence[int], reason: str) -> Layout:
        """A layout for a tensor whose dims (past the batch dim) are fixed by an opaque producer."""
        axes = []
        for d, size in enumerate(shape):
            if d == 0 or size <= 1:
                continue
            ids = self.coupling.new_space(node.name, size, f"dim{d}")
            self.coupling.freeze(ids, reason)
            axes.append(Axis((d,), ids))
        return Layout(len(shape), tuple(axes))


class LayoutProp(fx.Interpreter):
    """Propagate channel layouts through a GraphModule whose nodes carry ShapeProp metadata."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.coupling = Coupling()
        self.ctx = RuleContext(gm, self.coupling, self.env)
        self.boundaries: dict[str, str] = {}

    def run_node(self, n: fx.Node) -> Any:
        self.ctx.env = self.env
        if n.op == "placeholder":
            shape = meta_shape(n)
            if shape is None:
                return Dynamic(n)
            return self.ctx.frozen_fresh(n, shape, f"graph input {n.name}")
        if n.op == "output":
            self.ctx.freeze_layout(self.ctx.value(n.args[0]), f"reaches graph output via {_producer(n)}")
            return None
        if n.op == "get_attr":
            return self._get_attr(n)
        return self._call(n)

    def _get_attr(self, n: fx.Node) -> Any:
        obj = self.fetch_attr(n.target)
        if not isinstance(obj, torch.Tensor):
            return Dynamic(n)
        axes = []
        for d, size in enumerate(obj.shape):
            if size > 1:
                ids = self.coupling.new_space(n.name, int(size), f"dim{d}")
                self.coupling.member(n.name, n.target, id(obj), d, "chan", ids)
                axes.append(Axis((d,), ids))
        return Layout(obj.dim(), tuple(axes))

    def _call(self, n: fx.Node) -> Any:
        inputs = list(n.all_input_nodes)
        if not _has_tensor_meta(n):
            return _size_value(n, self.env)
        rule = lookup(n, self.module)
        if rule is not None:
            try:
                out = rule.propagate(self.ctx, n)
            except Exception as exc:  # a rule that cannot handle this use is a boundary too
                reason = f"{_describe(n, self.module)} (rule '{rule.name}' declined: {exc})"
            else:
                if not rule.sizes:  # only ops whose fixer rewrites sizes may take sizes that change
                    for a in inputs:
                        if isinstance(self.env[a], Dynamic) and self.env[a].taint.size:
                            self.coupling.freeze(
                                self.env[a].taint, f"{n.name}: uses a size that pruning would change"
                            )
                return out
        else:
            reason = f"no rule for {_describe(n, self.module)}"
        self.boundaries[n.name] = reason
        for a in inputs:
            self.ctx.freeze_layout(self.env[a], reason)
            if isinstance(self.env[a], Dynamic):
                self.coupling.freeze(self.env[a].taint, reason)
        return self._opaque_output(n, reason)

    def _opaque_output(self, n: fx.Node, reason: str, meta: Any = None) -> Any:
        """Frozen fresh layouts shaped like the output, nested tuples too (an LSTM's ``(out, (h, c))``)."""
        meta = n.meta.get("tensor_meta") if meta is None else meta
        if is_tensor_meta(meta):
            return self.ctx.frozen_fresh(n, tuple(meta.shape), reason)
        if isinstance(meta, (list, tuple)):
            return tuple(self._opaque_output(n, reason, m) for m in meta)
        return Dynamic(n)


_SHAPE_FREE = {"dim", "ndimension", "dtype", "device", "is_cuda", "ndim", "requires_grad", "get_device"}
# calls whose non-tensor result (None) depends on no channel: timm's resolve_self_attn_mask(n, scores, None, False)
_NONE_CALLS = {"resolve_self_attn_mask"}


def _size_value(n: fx.Node, env: dict[fx.Node, Any]) -> Dynamic:
    """A non-tensor value: record which channels it depends on (``x.size(1)`` depends on x's)."""
    args = [env[a] if isinstance(a, fx.Node) else a for a in n.args]
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    first = args[0] if args else None
    if isinstance(first, Layout):
        if name == "size" and len(args) == 1 or name == "getattr" and args[1] == "shape":
            return Dynamic(n, all_ids(first), shape_of=first)
        if name == "size":
            d = args[1] + first.ndim if args[1] < 0 else args[1]
            return Dynamic(n, dim_ids(first, d), size_of=(first, d))
        if name in _SHAPE_FREE or name == "getattr" and args[1] in _SHAPE_FREE:
            return Dynamic(n)
    if (
        name == "getitem"
        and isinstance(first, Dynamic)
        and first.shape_of is not None
        and isinstance(args[1], int)
    ):
        d = args[1] + first.shape_of.ndim if args[1] < 0 else args[1]
        return Dynamic(n, dim_ids(first.shape_of, d), size_of=(first.shape_of, d))
    if (
        name == "getitem"
        and isinstance(first, Dynamic)
        and first.shape_of is not None
        and isinstance(args[1], slice)
    ):
        # ``x.shape[-2:]`` (an upsampling target) depends on the dims it keeps, not on the channels
        dims = range(first.shape_of.ndim)[args[1]]
        taint = [dim_ids(first.shape_of, d) for d in dims]
        return Dynamic(n, np.unique(np.concatenate(taint)) if taint else np.zeros(0, dtype=np.int64))
    if name in _NONE_CALLS and n.meta.get("tensor_meta", None) is None:
        return Dynamic(n)
    taints: list[np.ndarray] = []
    for a in n.all_input_nodes:
        v = env[a]
        if isinstance(v, Dynamic):
            taints.append(v.taint)
        else:
            taints.extend(all_ids(lay) for lay in layouts_in(v))
    return Dynamic(n, np.unique(np.concatenate(taints)) if taints else np.zeros(0, dtype=np.int64))


def _has_tensor_meta(n: fx.Node) -> bool:
    meta = n.meta.get("tensor_meta")
    if is_tensor_meta(meta):
        return True
    if isinstance(meta, (list, tuple)):
        return any(is_tensor_meta(m) for m in meta)
    if isinstance(meta, dict):
        return any(is_tensor_meta(m) for m in meta.values())
    return is_tensor_meta(meta)


def _producer(output: fx.Node) -> str:
    names = [a.name for a in output.all_input_nodes]
    return ", ".join(names[:3])


def _describe(n: fx.Node, gm: fx.GraphModule) -> str:
    if n.op == "call_module":
        return f"{n.name} (module {type(gm.get_submodule(n.target)).__name__})"
    if n.op == "call_method":
        return f"{n.name} (method .{n.target}())"
    target = getattr(n.target, "__qualname__", None) or getattr(n.target, "__name__", str(n.target))
    module = getattr(n.target, "__module__", "") or ""
    return f"{n.name} (function {module + '.' if module else ''}{target})"


def analyze(gm: fx.GraphModule, example_inputs: Any = None) -> DependencyGraph:
    """Group the channels of ``gm`` that must be pruned together.

    ``gm`` needs tensor shapes on its nodes (``idap_fx.trace`` records them); pass
    ``example_inputs`` to (re)record them here.
    """
    if not isinstance(gm, fx.GraphModule):
        raise AnalysisError(
            f"analyze() takes a torch.fx.GraphModule (see idap_fx.trace), got {type(gm).__name__}"
        )
    if example_inputs is not None:
        from idap_fx.capture.trace import record_shapes

        record_shapes(gm, example_inputs)
    missing = [  # an optional argument (a placeholder with a default) may be left out
        n.name for n in gm.graph.nodes if n.op == "placeholder" and not n.args and "tensor_meta" not in n.meta
    ]
    if missing:
        raise AnalysisError(
            f"node(s) {missing} carry no shapes: build the graph with idap_fx.trace(model, example_inputs) "
            "or pass example_inputs to analyze()"
        )
    prop = LayoutProp(gm)
    # placeholders are fed directly: no pytree (un)flattening of inputs/outputs (torch.export graphs have it)
    prop.run(*[None for n in gm.graph.nodes if n.op == "placeholder"], enable_io_processing=False)
    groups, coupling = prop.coupling.finish()
    layouts = {n.name: prop.env[n] for n in gm.graph.nodes if n in prop.env}
    return DependencyGraph(
        groups,
        coupling,
        layouts,
        prop.coupling.members,
        prop.coupling.input_masks,
        prop.coupling.n_elements,
        boundaries=dict(prop.boundaries),
    )
