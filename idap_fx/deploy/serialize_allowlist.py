"""The names a saved file may refer to: the allowlists of ``idap_fx.deploy.serialize``.

Why a module of its own: this is the security boundary of ``load``. Every function,
method and module class a file names is resolved here, both ways (``save`` writes
only names that resolve back to the same object), and nothing outside these lists is
imported or called:

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
* modules: ``torch.nn``, ``torchvision.ops`` and ``idap_fx.graph.modules`` classes
  (``PrunedMultiheadAttention``).

Anything else raises ``ExportError`` naming it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from idap_fx.errors import ExportError

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
_MODULE_NAMESPACES = ("torch.nn", "torchvision.ops", "idap_fx.graph.modules")
# Files saved before the package layout name the replacement modules by their old home.
_RENAMED_NAMESPACES = {"idap_fx.modules": "idap_fx.graph.modules"}
_FUNCTION_PACKAGES = ("torchvision.ops", "torchvision.models")
_WRAPPED_ONLY = ("torchvision.models",)  # there only torch.fx.wrap-ed helpers (not model builders)

__all__ = [
    "check_getattr",
    "check_method",
    "class_path",
    "function_name",
    "resolve_class",
    "resolve_function",
]


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


def resolve_function(qualname: str) -> Any:
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


def function_name(fn: Any) -> str:
    """The allowlisted qualified name of ``fn`` (resolving back to ``fn`` itself), else ExportError."""
    if any(fn is b for b in _BUILTINS.values()):
        return f"builtins.{fn.__name__}"
    candidates = [f"{ns}.{_reverse(ns)[id(fn)]}" for ns in _NAMESPACES if id(fn) in _reverse(ns)]
    module = getattr(fn, "__module__", None) or ""
    if _in_package(module, _FUNCTION_PACKAGES):
        candidates.append(f"{module}.{fn.__name__}")
    for qualname in candidates:
        try:
            if resolve_function(qualname) is fn:
                return qualname
        except ExportError:
            continue
    shown = f"{module}.{getattr(fn, '__qualname__', fn)}"
    raise ExportError(f"function {shown} is not in the serialization allowlist; it cannot be saved")


def check_method(name: str) -> str:
    """``name`` if it is an allowlisted public ``torch.Tensor`` method, else ExportError."""
    if name.startswith("_") or name in _DENIED_METHODS or not callable(getattr(torch.Tensor, name, None)):
        raise ExportError(
            f"method {name!r} is not an allowlisted public torch.Tensor method; it cannot be (de)serialized"
        )
    return name


def resolve_class(path: str) -> type[nn.Module]:
    """The allowlisted module class at dotted ``path``, else ExportError."""
    namespace, _, name = path.rpartition(".")
    namespace = _RENAMED_NAMESPACES.get(namespace, namespace)
    cls = getattr(importlib.import_module(namespace), name, None) if namespace in _MODULE_NAMESPACES else None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)) or issubclass(cls, fx.GraphModule):
        raise ExportError(
            f"module class {path} is not in the serialization allowlist (torch.nn, torchvision.ops, idap_fx.graph.modules)"
        )
    return cls


def class_path(cls: type) -> str:
    """The allowlisted dotted path of module class ``cls`` (resolving back to it), else ExportError."""
    for namespace in _MODULE_NAMESPACES:
        path = f"{namespace}.{cls.__name__}"
        if getattr(importlib.import_module(namespace), cls.__name__, None) is cls and resolve_class(path):
            return path
    raise ExportError(
        f"module class {cls.__module__}.{cls.__qualname__} is not in the serialization allowlist "
        "(torch.nn, torchvision.ops, idap_fx.graph.modules); trace through it or replace it"
    )


def check_getattr(target: Any, args: tuple) -> None:
    """A ``getattr`` call may only read a public attribute named by a string; else ExportError."""
    if target is getattr and (len(args) < 2 or not isinstance(args[1], str) or args[1].startswith("_")):
        raise ExportError(
            f"getattr with attribute {args[1:2]!r} is not allowed (public attribute names only)"
        )
