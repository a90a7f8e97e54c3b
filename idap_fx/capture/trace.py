"""Capture a model as a ``torch.fx.GraphModule`` with tensor shapes on every node.

The caller's model is deep-copied first (a GraphModule shares its root's submodules,
so tracing in place would let later rewrites or fine-tuning touch the caller's
weights), put in eval mode, traced, and run once to record shapes (as ``ShapeProp`` does).
"""

from __future__ import annotations

import copy
import inspect
import traceback
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from idap_fx.capture.constants import fold_constants
from idap_fx.capture.positional import positional_arguments
from idap_fx.capture.shapes import as_tuple, record_shapes
from idap_fx.errors import TraceError

__all__ = ["record_shapes", "trace"]  # record_shapes lives in idap_fx.capture.shapes; re-exported for callers

# Converted (int8) modules; ``FloatFunctional`` is the float add/cat of quantization-ready float models.
_QUANTIZED_MODULES = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized", "torch.nn.quantized")


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


def _is_quantized(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_quantized
    return isinstance(value, (tuple, list)) and any(_is_quantized(v) for v in value)


def _check_model(model: nn.Module) -> None:
    """Refuse what cannot be pruned: integer or quantized weights."""
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            raise TraceError(
                f"parameter {name!r} has dtype {p.dtype}: idap_fx prunes floating-point models "
                "(prune before quantizing)"
            )
    for name, m in model.named_modules():
        cls = type(m)
        if cls.__module__.startswith(_QUANTIZED_MODULES) and cls.__name__ != "FloatFunctional":
            raise TraceError(
                f"module {name or '<root>'!r} is a quantized {cls.__name__}: idap_fx prunes "
                "floating-point models (prune the float model, then quantize it)"
            )
    for name, value in model.state_dict().items():
        if _is_quantized(value):
            raise TraceError(
                f"state {name!r} holds a quantized tensor: idap_fx prunes floating-point models "
                "(prune the float model, then quantize it)"
            )


def _check_inputs(model: nn.Module, inputs: tuple[Any, ...]) -> None:
    """Example inputs must be plain tensors on the model's device."""
    where = next(
        ((n, t.device) for n, t in [*model.named_parameters(), *model.named_buffers()]), (None, None)
    )
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise TraceError(f"example input {i} is a {type(x).__name__}, not a tensor")
        if x.is_quantized:
            raise TraceError(
                f"example input {i} is a quantized tensor ({x.dtype}): idap_fx prunes floating-point "
                "models; give float example inputs"
            )
        if where[0] is not None and x.device != where[1]:
            meta = "meta" in (x.device.type, where[1].type)
            raise TraceError(
                f"example input {i} is on {x.device} but the model's {where[0]!r} is on {where[1]}: "
                "put the model and the example inputs on one device"
                + (" (a meta-device model has no weights: load them first)" if meta else "")
            )


def _state(module: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return {name: (t, t._version) for name, t in tensors}


def _check_state_kept(model: nn.Module, before: dict[str, tuple[torch.Tensor, int]]) -> None:
    """Refuse a forward() that changed a buffer while being traced (the update would be lost)."""
    after = _state(model)
    for name, (t, version) in before.items():
        now = after.get(name)
        if now is None or now[0] is not t or now[1] != version:
            raise TraceError(
                f"{type(model).__name__}.forward() "
                f"{'modifies' if now is not None and now[0] is t else 'reassigns'} {name!r} while being "
                "traced; the update would run once at trace time and then be missing from the graph. "
                "Guard a state update (counter, running statistic) with `if self.training:` (idap_fx "
                "traces in eval mode) or remove it"
            )


_CONSTANTS = (type(None), bool, int, float, str)


def _optional_defaults(
    model: nn.Module, n_inputs: int, given: dict[str, Any] | None
) -> dict[str, Any] | None:
    """Pin the optional arguments the example inputs leave out (``attn_mask=None``) to their defaults.

    fx would otherwise trace them as proxies, so ``if attn_mask is not None`` would take the
    branch the example never runs. Only constant defaults are pinned; arguments named in
    ``concrete_args`` keep the caller's value.
    """

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return given
    pinned = dict(given or {})
    for p in params[n_inputs:]:
        named = p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        if named and p.name not in pinned and p.default is not p.empty and isinstance(p.default, _CONSTANTS):
            pinned[p.name] = p.default
    return pinned or given


def trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Sequence[type] = (),
    concrete_args: dict[str, Any] | None = None,
    share_parameters: bool = False,
) -> fx.GraphModule:
    """Trace ``model`` (an ``nn.Module`` or a ``GraphModule``) into a new GraphModule with shapes.

    The result is a copy; with ``share_parameters`` its parameters are the caller's own tensors
    (no second copy of the weights: ``optimize``, which never changes them in place).

    ``leaf_modules`` are module types kept as opaque calls (their channels are frozen);
    ``concrete_args`` pins Python arguments that steer control flow; optional arguments the
    example inputs leave out are pinned to their (constant) defaults. Raises ``TraceError``
    for integer or quantized weights, example inputs on another device than the model
    (a meta-device model traces only with meta inputs), and a forward() that modifies its
    inputs, parameters or buffers in place (in-place ops on intermediate activations,
    such as ``ReLU(inplace=True)``, are fine).
    """
    if isinstance(model, torch.export.ExportedProgram):
        from idap_fx.capture.torch_export import from_exported

        return from_exported(model, example_inputs)
    if not isinstance(model, nn.Module):
        raise TraceError(f"trace() takes an nn.Module or a GraphModule, got {type(model).__name__}")
    _check_model(model)
    inputs = as_tuple(example_inputs)
    _check_inputs(model, inputs)
    memo = {id(p): p for p in model.parameters()} if share_parameters else {}
    copied = copy.deepcopy(model, memo).eval()
    if isinstance(copied, fx.GraphModule):
        gm = copied
    else:
        concrete_args = _optional_defaults(copied, len(inputs), concrete_args)
        tracer = _RecordingTracer(leaf_modules)
        state = _state(copied)
        try:
            graph = tracer.trace(copied, concrete_args=concrete_args)
        except Exception as exc:
            inside = tracer.stack[-1] if tracer.stack else "<root>"
            raise TraceError(
                f"torch.fx cannot trace {type(model).__name__}: inside module {inside!r} "
                f"({type(copied.get_submodule(inside)).__name__ if inside != '<root>' else type(model).__name__}) "
                f"at {_user_frame(exc)}: {exc}. Hint: make that module a leaf "
                "(trace(..., leaf_modules=[ItsClass])), fix the branch with concrete_args, or capture "
                "the model with torch.export and pass the program: trace(torch.export.export(model, "
                "inputs), inputs) (docs/export.md)."
            ) from exc
        _check_state_kept(copied, state)
        gm = fx.GraphModule(copied, graph, class_name=type(model).__name__)
    positional_arguments(gm)
    # clones: an in-place op on an input is refused after it ran, the caller's tensors stay intact
    record_shapes(gm, tuple(x.clone() for x in inputs), watch=True)
    fold_constants(gm)
    return gm
