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
through allowlists (torch ops, ``torch.nn.functional``, ``operator``, ``math``, a
few builtins, public ``torch.Tensor`` methods, ``torch.nn`` / ``torchvision.ops`` /
``idap_fx.graph.modules`` classes; the full list is in ``idap_fx.deploy.serialize_allowlist``),
so nothing from the file is executed or imported freely. Leaf modules are built on
the meta device from constructor kwargs read off the module's attributes (plain
values only) or, where a class keeps them only as shapes, off its tensors; then
filled with ``load_state_dict(strict=True, assign=True)``.

Anything that cannot be described this way raises ``ExportError`` naming it, at
save time: ``save`` rebuilds the model from the payload before writing and refuses
to write what ``load`` could not rebuild identically (state keys, shapes, module reprs).

Three modules, data flowing one way: this one is the file (format tag, plan and
report, ``save``/``load``); ``idap_fx.deploy.serialize_payload`` converts a GraphModule
to the payload and back; ``idap_fx.deploy.serialize_allowlist`` names what a file may use.

Not preserved: node ``meta`` (shape annotations), placeholder type annotations
other than Tensor/int/float/bool/str, and module aliasing (one module object
under two names is rebuilt as two modules with equal weights).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, is_dataclass
from typing import Any

import torch
from torch import fx, nn

from idap_fx.deploy.files import atomic_output
from idap_fx.deploy.serialize_payload import build, describe_graph_module
from idap_fx.errors import ExportError

__all__ = ["FORMAT", "load", "save"]

FORMAT = "idap_fx/1"


def _plain(value: Any) -> Any:
    """Dataclasses and objects with ``to_dict`` (also inside lists and dicts) as dicts."""
    if hasattr(value, "to_dict"):
        return _plain(value.to_dict())
    if is_dataclass(value) and not isinstance(value, type):
        return _plain(asdict(value))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _jsonable(value: Any, what: str) -> Any:
    """``value`` (dict, dataclass, object with ``to_dict``, or a list of them) as plain JSON data, or None."""
    if value is None:
        return None
    try:
        return json.loads(json.dumps(_plain(value)))
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
    describe_graph_module(gm, "", payload)
    _verify_rebuild(gm, build(payload))
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
    gm = build(payload)
    gm.meta["idap_fx"] = {"plan": payload["plan"], "report": payload["report"]}
    return gm
