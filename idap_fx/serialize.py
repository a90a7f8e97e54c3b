"""Save/load a pruned GraphModule as one file that needs neither pickle trust nor the user's code.

Why not ``torch.save(gm)``: that pickles the model's Python class, so loading
needs the original source and executes arbitrary code. Why not ``exec`` of
``gm.code``: the generated source is a program, and running a program from a
file is what ``weights_only`` loading exists to avoid.

Chosen approach: the file is ``torch.save`` of a dict of weights_only-safe
types only (str, int, float, bool, None, tuples, lists, dicts, tensors)::

    {"format": "idap_fx/1",
     "code": {path: generated source}        # for humans and diffs; never executed
     "graphs": {path: [node, ...]}           # "" is the root, others nested GraphModules
     "modules": {path: {"class": "torch.nn.Conv2d", "kwargs": {...}}}   # leaf modules
     "attributes": {path: {"kind": "parameter" | "buffer", "requires_grad": bool}}
     "class_names", "training", "frozen", "state_dict", "plan", "report"}

Each node is ``{"op", "name", "target", "args", "kwargs", "type"}``; node
references in args are ``{"__node__": name}`` and non-JSON values (slices,
dtypes, devices, dicts, ...) are tagged the same way. ``load`` rebuilds the
graph node by node with ``fx.Graph.create_node`` and resolves every target
through allowlists, so nothing from the file is executed or imported freely:

* functions: ``torch`` tensor ops (``torch._C._VariableFunctions``,
  ``torch.functional``, ``torch._assert``; not ``from_file``), public functions
  of ``torch.nn.functional``, ``torch.fft``/``linalg``/``special``, ``operator``
  (not ``call``/``attrgetter``/``itemgetter``/``methodcaller``) and ``math``, the
  builtins ``getattr`` (public attribute names only), ``len``, ``abs``, ``min``,
  ``max``, functions defined in ``torchvision.ops`` modules, and the helpers
  that ``torchvision.models`` registers with ``torch.fx.wrap`` (Swin's window
  attention, ...; never a model builder, which could download weights);
* methods (``call_method``): public ``torch.Tensor`` methods except those that
  take a Python callable or share memory (``apply_``, ``map_``, ``register_hook``, ...);
* modules: ``torch.nn``, ``torchvision.ops`` and ``idap_fx.modules`` classes
  (``PrunedMultiheadAttention``), built on the meta device from constructor
  kwargs read off the module's attributes (plain values only) or, where a class
  keeps them only as shapes, off its tensors; then filled with
  ``load_state_dict(strict=True, assign=True)``.

Anything else raises ``ExportError`` naming it, at save time: ``save`` rebuilds
the model from the payload before writing and refuses to write what ``load``
could not rebuild identically (state keys, shapes, module reprs).

Not preserved: node ``meta`` (shape annotations), placeholder type annotations
other than Tensor/int/float/bool/str, and module aliasing (one module object
under two names is rebuilt as two modules with equal weights).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import math
import operator
import os
from dataclasses import asdict, is_dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from idap_fx.errors import ExportError
from idap_fx.files import atomic_output
from idap_fx.modules import PrunedMultiheadAttention

__all__ = ["FORMAT", "load", "save"]

FORMAT = "idap_fx/1"

_NAMESPACES: dict[str, Any] = {
    "torch": torch,
    "torch.nn.functional": F,
    "torch.fft": torch.fft,
    "torch.linalg": torch.linalg,
    "torch.special": torch.special,
    "operator": operator,
    "math": math,
}
_BUILTINS = {f.__name__: f for f in (getattr, len, abs, min, max)}
# Callables that read files or build/call other callables: a graph never needs them, an attacker would.
_DENIED = {
    "torch": frozenset({"from_file"}),
    "operator": frozenset({"call", "attrgetter", "itemgetter", "methodcaller"}),
}
_DENIED_METHODS = frozenset(
    {"apply_", "map_", "map2_", "register_hook", "register_post_accumulate_grad_hook", "share_memory_"}
)
_MODULE_NAMESPACES = ("torch.nn", "torchvision.ops", "idap_fx.modules")
_FUNCTION_PACKAGES = ("torchvision.ops", "torchvision.models")
_WRAPPED_ONLY = ("torchvision.models",)  # there only torch.fx.wrap-ed helpers (not model builders)
_TYPES = {"torch.Tensor": torch.Tensor, "int": int, "float": float, "bool": bool, "str": str}
_PLAIN = (bool, int, float, str, type(None))


# ---- allowlisted names ------------------------------------------------------------------------------------


@functools.cache
def _torch_ops() -> frozenset[str]:
    ops = {n for n in dir(torch._C._VariableFunctions) if not n.startswith("__")}
    return frozenset(ops | set(torch.functional.__all__) | {"_assert"})


@functools.cache
def _reverse(namespace: str) -> dict[int, str]:
    """id(function) -> its name in ``namespace``, public names preferred."""
    names: dict[int, str] = {}
    for name, obj in vars(_NAMESPACES[namespace]).items():
        if callable(obj) and (id(obj) not in names or names[id(obj)].startswith("_")):
            names[id(obj)] = name
    return names


def _in_package(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _fx_wrapped(module: str, name: str) -> bool:
    """Whether ``module.name`` was registered with ``torch.fx.wrap`` (so it shows up as a graph call).

    Reads torch.fx's registry of wrapped functions, keyed by (id(module globals), name)
    (a private table, checked on the pinned torch); without it nothing qualifies.
    """
    registry = getattr(torch.fx._symbolic_trace, "_wrapped_fns_to_patch", {})
    return (id(vars(importlib.import_module(module))), name) in registry


def _resolve_function(qualname: str) -> Any:
    """The allowlisted function called ``qualname``, else ExportError."""
    module, _, name = qualname.rpartition(".")
    fn = None
    if name in _DENIED.get(module, ()):
        pass
    elif module == "builtins":
        fn = _BUILTINS.get(name)
    elif module == "torch":
        fn = getattr(torch, name, None) if name in _torch_ops() else None
    elif module in _NAMESPACES:
        candidate = getattr(_NAMESPACES[module], name, None)
        fn = candidate if not name.startswith("_") and inspect.isroutine(candidate) else None
    elif _in_package(module, _FUNCTION_PACKAGES):
        try:
            candidate = getattr(importlib.import_module(module), name, None)
        except ImportError:
            candidate = None
        if inspect.isfunction(candidate) and candidate.__module__ == module:
            fn = candidate if not _in_package(module, _WRAPPED_ONLY) or _fx_wrapped(module, name) else None
    if fn is None:
        raise ExportError(
            f"function {qualname} is not in the serialization allowlist (torch ops, torch.nn.functional, "
            "operator, math, a few builtins, torchvision.ops functions, fx-wrapped torchvision.models helpers)"
        )
    return fn


def _function_name(fn: Any) -> str:
    """The allowlisted qualified name of ``fn`` (resolving back to ``fn`` itself), else ExportError."""
    if any(fn is b for b in _BUILTINS.values()):
        return f"builtins.{fn.__name__}"
    candidates = [f"{ns}.{_reverse(ns)[id(fn)]}" for ns in _NAMESPACES if id(fn) in _reverse(ns)]
    module = getattr(fn, "__module__", None) or ""
    if _in_package(module, _FUNCTION_PACKAGES):
        candidates.append(f"{module}.{fn.__name__}")
    for qualname in candidates:
        try:
            if _resolve_function(qualname) is fn:
                return qualname
        except ExportError:
            continue
    shown = f"{module}.{getattr(fn, '__qualname__', fn)}"
    raise ExportError(f"function {shown} is not in the serialization allowlist; it cannot be saved")


def _check_method(name: str) -> str:
    if name.startswith("_") or name in _DENIED_METHODS or not callable(getattr(torch.Tensor, name, None)):
        raise ExportError(
            f"method {name!r} is not an allowlisted public torch.Tensor method; it cannot be (de)serialized"
        )
    return name


def _resolve_class(path: str) -> type[nn.Module]:
    namespace, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(namespace), name, None) if namespace in _MODULE_NAMESPACES else None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)) or issubclass(cls, fx.GraphModule):
        raise ExportError(
            f"module class {path} is not in the serialization allowlist (torch.nn, torchvision.ops, idap_fx.modules)"
        )
    return cls


def _class_path(cls: type) -> str:
    for namespace in _MODULE_NAMESPACES:
        path = f"{namespace}.{cls.__name__}"
        if getattr(importlib.import_module(namespace), cls.__name__, None) is cls and _resolve_class(path):
            return path
    raise ExportError(
        f"module class {cls.__module__}.{cls.__qualname__} is not in the serialization allowlist "
        "(torch.nn, torchvision.ops, idap_fx.modules); trace through it or replace it"
    )


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


def _check_getattr(target: Any, args: tuple) -> None:
    if target is getattr and (len(args) < 2 or not isinstance(args[1], str) or args[1].startswith("_")):
        raise ExportError(
            f"getattr with attribute {args[1:2]!r} is not allowed (public attribute names only)"
        )


def _encode_node(node: fx.Node) -> dict[str, Any]:
    if node.op == "call_function":
        target = _function_name(node.target)
        _check_getattr(node.target, node.args)
    elif node.op == "call_method":
        target = _check_method(node.target)
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
            target = _resolve_function(target)
            _check_getattr(target, args)
        elif op == "call_method":
            target = _check_method(target)
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
    cls_path = _class_path(type(module))
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
    cls = _resolve_class(desc["class"])
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


def _describe_graph_module(gm: fx.GraphModule, prefix: str, payload: dict[str, Any]) -> None:
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
                _describe_graph_module(sub, path, payload)
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


def _build(payload: dict[str, Any]) -> fx.GraphModule:
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


# ---- public API -------------------------------------------------------------------------------------------


def _jsonable(value: Any, what: str) -> Any:
    """``value`` (dict, dataclass or object with ``to_dict``) as plain JSON data, or None."""
    if value is None:
        return None
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    elif is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise ExportError(f"the {what} cannot be saved: it is not JSON-serialisable ({e})") from e


def _canonical_repr(module: nn.Module) -> str:
    """``repr(module)`` with NonDynamicallyQuantizableLinear shown as Linear.

    That subclass only marks attention output projections for the quantization
    tooling and computes exactly what ``nn.Linear`` does; a pruned attention's
    ``out_proj`` is one, and ``PrunedMultiheadAttention`` rebuilds it as a Linear.
    """
    return repr(module).replace("NonDynamicallyQuantizableLinear(", "Linear(")


def _verify_rebuild(original: fx.GraphModule, rebuilt: fx.GraphModule) -> None:
    """Every rebuilt leaf module must print exactly like the original (hyperparameters included)."""
    for name, module in rebuilt.named_modules():
        leaf = not isinstance(module, fx.GraphModule) and type(module) is not nn.Module
        want = original.get_submodule(name)
        if leaf and _canonical_repr(module) != _canonical_repr(want):
            raise ExportError(f"{name} rebuilds as {module!r}, not as {want!r}")


def save(model_or_result: Any, path: str | os.PathLike[str]) -> None:
    """Write a GraphModule (or a result with ``.model`` and optional ``.plan``/``.report``) to ``path``.

    The model is rebuilt from the payload before anything is written, so a file
    that ``save`` produces is one that ``load`` can rebuild. Atomic: on failure
    no file is left at ``path``.
    """
    gm = getattr(model_or_result, "model", model_or_result)
    if not isinstance(gm, fx.GraphModule):
        raise ExportError(
            f"save needs a torch.fx.GraphModule (or a result with .model), got {type(gm).__name__}"
        )
    payload: dict[str, Any] = {
        "format": FORMAT,
        **{key: {} for key in ("code", "class_names", "graphs", "modules", "attributes", "state_dict")},
        "training": {name: m.training for name, m in gm.named_modules(remove_duplicate=False)},
        "frozen": [name for name, p in gm.named_parameters(remove_duplicate=False) if not p.requires_grad],
        "plan": _jsonable(getattr(model_or_result, "plan", None), "plan"),
        "report": _jsonable(getattr(model_or_result, "report", None), "report"),
    }
    _describe_graph_module(gm, "", payload)
    _verify_rebuild(gm, _build(payload))
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)


def load(path: str | os.PathLike[str], *, map_location: Any = None) -> fx.GraphModule:
    """Rebuild the GraphModule saved at ``path``; plan and report are in ``gm.meta["idap_fx"]``.

    Uses ``torch.load(weights_only=True)`` and allowlisted names only; needs no user code.
    """
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ExportError(f"{os.fspath(path)} is not a weights_only-loadable idap_fx file: {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ExportError(f"{os.fspath(path)} is not an {FORMAT} file (format: {found!r})")
    gm = _build(payload)
    gm.meta["idap_fx"] = {"plan": payload["plan"], "report": payload["report"]}
    return gm
