"""A GraphModule as the weights_only-safe payload of ``idap_fx.deploy.serialize``, and back.

Why a module of its own: this is the format's data model, apart from the file
(``serialize.save``/``load``) and from the names it may use (``serialize_allowlist``).
``describe_graph_module`` turns a GraphModule into plain data: each graph as a list of
nodes (node references and non-JSON values tagged), each called leaf module as its
class path and constructor kwargs, each ``get_attr`` tensor with its kind; ``build``
turns such data back into a GraphModule, node by node with ``fx.Graph.create_node``,
leaf modules on the meta device, then filled with ``load_state_dict(strict=True,
assign=True)``. Every function, method and class goes through the allowlists both ways.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
from torch import fx, nn

from idap_fx.deploy.serialize_allowlist import (
    check_getattr,
    check_method,
    class_path,
    function_name,
    resolve_class,
    resolve_function,
)
from idap_fx.errors import ExportError
from idap_fx.graph.modules import PrunedMultiheadAttention

__all__ = ["build", "describe_graph_module"]

_TYPES = {"torch.Tensor": torch.Tensor, "int": int, "float": float, "bool": bool, "str": str}
_PLAIN = (bool, int, float, str, type(None))


# ---- values -----------------------------------------------------------------------------------------------


def _encode(value: Any) -> Any:
    """A node argument as weights_only-safe data (node references and special values tagged)."""
    if isinstance(value, fx.Node):
        return {"__node__": value.name}
    if isinstance(value, torch.Size):
        return {"__size__": list(value)}
    if isinstance(value, _PLAIN):
        return value
    if type(value) is tuple:
        return tuple(_encode(v) for v in value)
    if isinstance(value, list):  # fx stores lists as immutable_list; it converts them back on load
        return [_encode(v) for v in value]
    if isinstance(value, dict):  # likewise immutable_dict
        return {"__dict__": [[_encode(k), _encode(v)] for k, v in value.items()]}
    if isinstance(value, slice):
        return {"__slice__": [_encode(value.start), _encode(value.stop), _encode(value.step)]}
    if value is Ellipsis:
        return {"__ellipsis__": True}
    if isinstance(value, torch.dtype | torch.memory_format | torch.layout):
        return {"__torch__": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"__device__": str(value)}
    raise ExportError(f"cannot serialize a node argument of type {type(value).__qualname__}: {value!r}")


def _decode(value: Any, env: dict[str, fx.Node]) -> Any:
    if isinstance(value, tuple | list):
        return type(value)(_decode(v, env) for v in value)
    if not isinstance(value, dict):
        return value
    if len(value) != 1:
        raise ExportError(f"malformed serialized value {value!r}")
    ((tag, payload),) = value.items()
    if tag == "__node__":
        return env[payload]
    if tag == "__size__":
        return torch.Size(payload)
    if tag == "__dict__":
        return {_decode(k, env): _decode(v, env) for k, v in payload}
    if tag == "__slice__":
        return slice(*(_decode(v, env) for v in payload))
    if tag == "__ellipsis__":
        return Ellipsis
    if tag == "__device__":
        return torch.device(payload)
    constant = getattr(torch, payload, None) if tag == "__torch__" else None
    if not isinstance(constant, torch.dtype | torch.memory_format | torch.layout):
        raise ExportError(f"unknown serialized value {value!r}")
    return constant


# ---- graphs -----------------------------------------------------------------------------------------------


def _encode_node(node: fx.Node) -> dict[str, Any]:
    if node.op == "call_function":
        target = function_name(node.target)
        check_getattr(node.target, node.args)
    elif node.op == "call_method":
        target = check_method(node.target)
    else:
        target = node.target
    type_name = next((k for k, t in _TYPES.items() if node.type is t), None)
    return {
        "op": node.op,
        "name": node.name,
        "target": target,
        "args": _encode(node.args),
        "kwargs": {k: _encode(v) for k, v in node.kwargs.items()},
        "type": type_name,
    }


def _decode_graph(nodes: list[dict[str, Any]]) -> fx.Graph:
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for desc in nodes:
        op, target = desc["op"], desc["target"]
        args = _decode(desc["args"], env)
        kwargs = {k: _decode(v, env) for k, v in desc["kwargs"].items()}
        if op == "call_function":
            target = resolve_function(target)
            check_getattr(target, args)
        elif op == "call_method":
            target = check_method(target)
        elif op not in ("placeholder", "get_attr", "call_module", "output"):
            raise ExportError(f"unknown node op {op!r} in node {desc['name']}")
        node = graph.create_node(
            op, target, args, kwargs, name=desc["name"], type_expr=_TYPES.get(desc["type"])
        )
        env[desc["name"]] = node
    graph.lint()
    return graph


# ---- modules ----------------------------------------------------------------------------------------------


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _plain(value: Any) -> bool:
    return isinstance(value, _PLAIN) or (isinstance(value, tuple | list) and all(_plain(v) for v in value))


def _pruned_mha_kwargs(module: PrunedMultiheadAttention) -> dict[str, Any]:
    """The constructor arguments that PrunedMultiheadAttention keeps only as tensor shapes."""
    return {
        "in_dim": module.in_proj_weight.shape[1],
        "out_dim": module.out_proj.out_features,
        "bias": module.in_proj_bias is not None,
    }


# Classes some of whose constructor arguments are not stored as same-named attributes.
_SHAPE_KWARGS = {PrunedMultiheadAttention: _pruned_mha_kwargs}


def _describe_module(path: str, module: nn.Module) -> dict[str, Any]:
    """Class path and constructor kwargs, read from the same-named attributes of the module."""
    cls_path = class_path(type(module))
    kwargs = {}
    derived = _SHAPE_KWARGS[type(module)](module) if type(module) in _SHAPE_KWARGS else {}
    for p in inspect.signature(type(module).__init__).parameters.values():
        if p.name in ("self", "device", "dtype") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name in derived:
            kwargs[p.name] = derived[p.name]
            continue
        if not hasattr(module, p.name):
            if p.default is p.empty:
                raise ExportError(
                    f"cannot rebuild {path} ({cls_path}): argument {p.name!r} is not stored on it"
                )
            continue
        value = getattr(module, p.name)
        if isinstance(value, torch.Tensor) or (value is None and isinstance(p.default, bool)):
            value = value is not None  # e.g. bias=True/False, stored as a Parameter or None
        if not _plain(value):
            raise ExportError(
                f"cannot rebuild {path} ({cls_path}): argument {p.name}={value!r} is not a plain value"
            )
        kwargs[p.name] = value
    return {"class": cls_path, "kwargs": kwargs}


def _build_leaf(path: str, desc: dict[str, Any]) -> nn.Module:
    cls = resolve_class(desc["class"])
    try:
        with torch.device("meta"):  # no random init: every tensor comes from the state dict
            return cls(**desc["kwargs"])
    except Exception as e:
        raise ExportError(f"cannot rebuild {path} as {desc['class']}({desc['kwargs']}): {e}") from e


def _install(
    root: nn.Module,
    target: str,
    value: nn.Module | torch.Tensor,
    kind: str = "module",
    requires_grad: bool = False,
) -> None:
    """Put ``value`` at dotted ``target`` under ``root``, creating empty containers; keep what is there."""
    *parents, name = target.split(".")
    for part in parents:
        if not hasattr(root, part):
            root.add_module(part, nn.Module())
        root = getattr(root, part)
    if hasattr(root, name):
        return
    if kind == "module":
        root.add_module(name, value)
    elif kind == "parameter":
        root.register_parameter(name, nn.Parameter(value, requires_grad=requires_grad))
    else:
        root.register_buffer(name, value)


def describe_graph_module(gm: fx.GraphModule, prefix: str, payload: dict[str, Any]) -> None:
    """Add ``gm`` (at ``prefix``) and everything its graph uses to ``payload``, recursively."""
    if type(gm.graph._codegen) is not fx.graph.CodeGen:
        raise ExportError(
            f"GraphModule {prefix or '<root>'} uses a custom codegen (pytree inputs); not supported"
        )
    payload["code"][prefix] = gm.code
    payload["class_names"][prefix] = type(gm).__name__
    payload["graphs"][prefix] = [_encode_node(n) for n in gm.graph.nodes]
    for node in gm.graph.nodes:
        path = _join(prefix, node.target) if node.op in ("call_module", "get_attr") else None
        if node.op == "call_module":
            sub = gm.get_submodule(node.target)
            if isinstance(sub, fx.GraphModule):
                describe_graph_module(sub, path, payload)
            else:
                payload["modules"][path] = _describe_module(path, sub)
                payload["state_dict"].update({_join(path, k): v for k, v in sub.state_dict().items()})
        elif node.op == "get_attr":
            value = operator.attrgetter(node.target)(gm)
            if not isinstance(value, torch.Tensor):
                raise ExportError(
                    f"get_attr {path} is a {type(value).__name__}, not a tensor; cannot serialize it"
                )
            kind = "parameter" if isinstance(value, nn.Parameter) else "buffer"
            payload["attributes"][path] = {"kind": kind, "requires_grad": value.requires_grad}
            payload["state_dict"][path] = value.detach()


def _build_graph_module(payload: dict[str, Any], prefix: str) -> fx.GraphModule:
    graph = _decode_graph(payload["graphs"][prefix])
    root = nn.Module()
    for node in graph.nodes:  # modules first: a get_attr may point into a called module
        if node.op == "call_module":
            path = _join(prefix, node.target)
            if path in payload["graphs"]:
                sub = _build_graph_module(payload, path)
            elif path in payload["modules"]:
                sub = _build_leaf(path, payload["modules"][path])
            else:
                raise ExportError(f"the file describes no module for call_module target {path}")
            _install(root, node.target, sub)
    for node in graph.nodes:
        if node.op == "get_attr":
            path = _join(prefix, node.target)
            desc = payload["attributes"][path]
            _install(root, node.target, payload["state_dict"][path], desc["kind"], desc["requires_grad"])
    return fx.GraphModule(root, graph, class_name=payload["class_names"][prefix])


def build(payload: dict[str, Any]) -> fx.GraphModule:
    """The GraphModule a payload describes, with its tensors, training flags and frozen parameters."""
    gm = _build_graph_module(payload, "")
    try:
        gm.load_state_dict(payload["state_dict"], strict=True, assign=True)
    except RuntimeError as e:
        raise ExportError(f"the rebuilt modules do not match the saved tensors: {e}") from e
    for name, tensor in [*gm.named_parameters(), *gm.named_buffers()]:
        if tensor.is_meta:
            raise ExportError(
                f"{name} is not in the state dict (a non-persistent buffer?); cannot rebuild it"
            )
    for name, module in gm.named_modules():
        module.training = payload["training"].get(name, module.training)
    frozen = set(payload["frozen"])
    for name, param in gm.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    return gm
