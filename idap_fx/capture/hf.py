"""Tracing Hugging Face ``transformers`` models into GraphModules the analyzer can read.

Plain ``torch.fx`` cannot trace most Hugging Face models (they branch on sizes and
flags); ``transformers.utils.fx.symbolic_trace`` can, but only in transformers 4.x (v5
removed it: capture with ``torch.export`` there and pass the ``ExportedProgram`` to
``idap_fx.capture.torch_export.from_exported``). ``trace_hf`` wraps the 4.x tracer and works around
two of its gaps in 4.57:

- forwards decorated with ``check_model_inputs`` (ViT, and other recent ports) hide a
  ``**kwargs`` that fx binds to ``None``; the undecorated forward is traced instead (it
  computes the same outputs: the decorator only records optional hidden states);
- causal masks are built with ``torch.vmap``, which cannot run on fx proxies; while
  tracing, the mask is built by broadcasting the same mask function instead.

Shapes built as ``x.size()[:-1] + (heads, head_dim)`` are then rewritten into explicit
size lists, so the literal widths in them are rewritten on pruning like any other.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import operator
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from idap_fx.capture.constants import fold_constants
from idap_fx.capture.positional import positional_arguments
from idap_fx.capture.trace import record_shapes
from idap_fx.errors import TraceError

SUPPORTED = "transformers>=4.57,<4.58 (pip install 'idap_fx[hf]')"


def _fx_module() -> Any:
    """``transformers.utils.fx``, or a TraceError that says which version to install."""
    try:
        import transformers
    except ImportError as exc:
        raise TraceError(f"trace_hf needs Hugging Face transformers: install {SUPPORTED}") from exc
    try:
        hf_fx = importlib.import_module("transformers.utils.fx")
    except ImportError as exc:
        raise TraceError(
            f"transformers {transformers.__version__} has no transformers.utils.fx (removed in v5): install "
            f"{SUPPORTED}, or capture the model with torch.export.export(...) and pass the ExportedProgram "
            "to idap_fx.capture.torch_export.from_exported"
        ) from exc
    return hf_fx


def _broadcast_mask(
    batch_size: Any,
    cache_position: torch.Tensor,
    kv_length: Any,
    kv_offset: Any = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    **_: Any,
) -> torch.Tensor:
    """Boolean (batch, 1, q, kv) mask: ``mask_function`` evaluated on broadcast index grids (no vmap)."""
    from transformers import masking_utils as mu

    fn = mask_function or mu.causal_mask_function
    padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset, _slice=False)
    if padding is not None:
        fn = mu.and_masks(fn, mu.padding_mask_function(padding.bool()))
    device = cache_position.device
    b = torch.arange(batch_size, device=device)[:, None, None, None]
    h = torch.arange(1, device=device)[None, :, None, None]
    q = cache_position[None, None, :, None]
    kv = (torch.arange(kv_length, device=device) + kv_offset)[None, None, None, :]
    return fn(b, h, q, kv).expand(batch_size, 1, cache_position.shape[0], kv_length)


def _broadcast_eager_mask(*args: Any, dtype: torch.dtype = torch.float32, **kwargs: Any) -> torch.Tensor:
    """The eager-attention form of ``_broadcast_mask``: 0 where attended, the dtype's minimum elsewhere."""
    blocked = _broadcast_mask(*args, **kwargs).logical_not()
    return blocked.to(dtype) * torch.finfo(dtype).min  # (where() with a scalar has no meta rule in HFTracer)


@contextlib.contextmanager
def _traceable_masks() -> Iterator[None]:
    """Swap the vmap-based sdpa/eager mask builders for broadcasting ones while tracing."""
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS as masks
    except ImportError:  # older 4.x: masks are built inline with plain tensor ops
        yield
        return
    saved = dict(masks._local_mapping)
    masks["sdpa"] = _broadcast_mask
    masks["eager"] = _broadcast_eager_mask
    try:
        yield
    finally:
        masks._local_mapping.clear()
        masks._local_mapping.update(saved)


def _tracer_class(hf_fx: Any) -> type:
    """HFTracer that can unpack a proxy of known length (``(*x.shape[:-1], -1, d)`` in GPT-2)."""

    class _Tracer(hf_fx.HFTracer):
        def iter(self, obj: fx.Proxy) -> Iterator[Any]:
            meta = getattr(obj, "_metadata", None)
            if meta is None or not hasattr(meta, "__len__"):
                return super().iter(obj)
            return iter([obj[i] for i in range(len(meta))])

    return _Tracer


def _undecorated(model: nn.Module) -> nn.Module:
    """``model`` itself, or (when its forward is wrapped by a decorator) a copy whose class runs the inner forward."""
    cls = type(model)
    inner = inspect.unwrap(cls.forward)
    if inner is cls.forward:
        return model
    model.__class__ = type(cls.__name__, (cls,), {"forward": inner, "__module__": cls.__module__})
    return model


def _concrete_args(model: nn.Module, input_names: Sequence[str]) -> dict[str, Any]:
    sig = inspect.signature(model.forward)
    unknown = [n for n in input_names if n not in sig.parameters]
    if unknown:
        raise TraceError(
            f"{type(model).__name__}.forward has no input(s) {unknown}; it takes {list(sig.parameters)}"
        )
    return {p.name: p.default for p in sig.parameters.values() if p.name not in input_names}


def trace_hf(
    model: nn.Module,
    input_names: Sequence[str],
    example_inputs: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
) -> fx.GraphModule:
    """Trace a transformers 4.x model with its fx tracer into a new GraphModule with shapes.

    ``input_names`` are the forward arguments that become graph inputs (in that order);
    ``example_inputs`` gives one tensor per name (a mapping or a sequence in the same
    order) to record shapes. ``model`` is not modified.
    """
    hf_fx = _fx_module()
    names = list(input_names)
    if isinstance(example_inputs, Mapping):
        missing = [n for n in names if n not in example_inputs]
        if missing:
            raise TraceError(f"example_inputs lacks {missing}")
        inputs = tuple(example_inputs[n] for n in names)
    else:
        inputs = tuple(example_inputs)
    copied = _undecorated(copy.deepcopy(model).eval())
    concrete = _concrete_args(copied, names)
    config = getattr(copied, "config", None)
    if config is not None and getattr(config, "use_cache", False) and "past_key_values" not in names:
        config.use_cache = False
    tracer = _tracer_class(hf_fx)()
    try:
        with _traceable_masks():
            graph = tracer.trace(copied, concrete_args=concrete)
    except Exception as exc:
        raise TraceError(
            f"transformers' fx tracer cannot trace {type(model).__name__} ({type(exc).__name__}: {exc}). "
            "Try attn_implementation='eager' in its config, or capture it with torch.export and use "
            "idap_fx.capture.torch_export.from_exported"
        ) from exc
    gm = fx.GraphModule(copied, graph, class_name=type(model).__name__)
    positional_arguments(gm)
    record_shapes(gm, inputs)
    fold_constants(gm)
    normalize_sizes(gm)
    return gm


def _size_source(node: Any) -> fx.Node | None:
    """The tensor whose ``.size()`` / ``.shape`` ``node`` is (None if it is not one)."""
    if not isinstance(node, fx.Node):
        return None
    is_size = node.op == "call_method" and node.target == "size" and len(node.args) == 1
    is_shape = node.op == "call_function" and node.target is getattr and node.args[1] == "shape"
    src = node.args[0] if is_size or is_shape else None
    return src if isinstance(src, fx.Node) and src.meta.get("tensor_meta") is not None else None


def _elements(node: Any) -> list[Any] | None:
    """The items of a size tuple built from ``x.size()``, slices of it and literal tuples (None if not that).

    Items are ints, nodes, or ``(size_node, dim)`` pairs standing for ``size_node[dim]``.
    """
    if isinstance(node, (tuple, list)):
        return list(node) if all(isinstance(v, (int, fx.Node)) for v in node) else None
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target is operator.add and len(node.args) == 2:
        left, right = (_elements(a) for a in node.args)
        return None if left is None or right is None else left + right
    sliced = None
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], slice):
        node, sliced = node.args[0], node.args[1]
    src = _size_source(node)
    if src is None:
        return None
    dims = list(range(len(src.meta["tensor_meta"].shape)))
    return [(node, d) for d in (dims[sliced] if sliced is not None else dims)]


def _drop_if_unused(graph: fx.Graph, node: Any) -> None:
    if isinstance(node, fx.Node) and not node.users and node.op in ("call_function", "call_method"):
        inputs = list(node.all_input_nodes)
        graph.erase_node(node)
        for a in inputs:
            _drop_if_unused(graph, a)


def normalize_sizes(gm: fx.GraphModule) -> None:
    """Make every size a graph computes an explicit ``t.size()[d]`` (in place).

    ``x.view(t.size()[:-1] + (h, d))`` becomes ``x.view(t.size()[0], t.size()[1], h, d)``
    and ``t.size()[:-1][0]`` becomes ``t.size()[0]``: the analyzer then sees which dim
    each size comes from, and the literal widths sit in the node's own arguments, where
    pruning rewrites them.
    """
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int):
            items = _elements(node.args[0])
            if (
                items is not None
                and isinstance(node.args[0], fx.Node)
                and node.args[0].target is operator.getitem
            ):
                item = items[node.args[1]]
                sliced = node.args[0]
                node.args = item if isinstance(item, tuple) else (sliced, node.args[1])
                _drop_if_unused(graph, sliced)
            continue
        is_view = node.op == "call_method" and node.target in ("view", "reshape")
        if not (is_view or node.op == "call_function" and node.target is torch.reshape):
            continue
        if len(node.args) != 2 or not isinstance(node.args[1], fx.Node):
            continue
        shape_node = node.args[1]
        items = _elements(shape_node)
        if items is None:
            continue
        with graph.inserting_before(node):
            items = [
                graph.call_function(operator.getitem, it) if isinstance(it, tuple) else it for it in items
            ]
        node.args = (node.args[0], *items) if is_view else (node.args[0], tuple(items))
        _drop_if_unused(graph, shape_node)
    graph.lint()
    gm.recompile()
