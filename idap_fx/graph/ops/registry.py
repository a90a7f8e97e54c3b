"""The op-semantics registry: how each op maps channel indices from inputs to outputs.

Rules are keyed by module type (``call_module``), function object (``call_function``)
or method name (``call_method``). A rule reads the layouts of the node's inputs from a
``RuleContext`` and returns the output's layout, recording couplings, parameter
members and frozen channels on the way. ``fix(rewrite, node)``, declared next to the
rule, updates what encodes a width once the rewrite has sliced the parameters: a
module's attributes (``out_channels``, ``normalized_shape`` ...) or the node's literal
arguments (view shapes, split sizes). Fixers only use the ``Rewrite`` protocol, so
``ops`` does not depend on ``idap_fx.rewrite.surgery``, which runs them. An op with no rule is a
boundary: the analyzer freezes every channel it touches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import fx, nn


class Rewrite(Protocol):
    """What a fixer may use of the rewrite (``surgery._Rewrite``), so ``ops`` need not import it."""

    gm: fx.GraphModule  # the copy being pruned, parameters already sliced

    def shape(self, node: fx.Node, index: int | None = None) -> list[int]:
        """``node``'s output shape after pruning (output ``index`` of a tuple/list output)."""
        ...

    def value(self, arg: Any) -> Any:
        """The analysis value of an argument (Layout, Dynamic, ...; a constant as itself)."""
        ...

    def kept(self, node: fx.Node, dim: int) -> np.ndarray:
        """Which positions along ``dim`` of ``node``'s (tensor) output survive pruning (bool, old size)."""
        ...


Propagate = Callable[[Any, fx.Node], Any]
Fixer = Callable[[Rewrite, fx.Node], None]


@dataclass(frozen=True)
class Rule:
    """One op's semantics: ``propagate(ctx, node) -> output value``, and its width fixer.

    ``sizes``: the fixer rewrites the op's size arguments (view / reshape / expand), so the op
    may take sizes that pruning changes; any other op freezes the channels such a size depends on.
    """

    name: str
    propagate: Propagate
    fix: Fixer | None = None
    sizes: bool = False


MODULE_RULES: dict[type, Rule] = {}
FUNCTION_RULES: dict[Callable, Rule] = {}
METHOD_RULES: dict[str, Rule] = {}
# third-party functions a tracer keeps as calls (``torch.fx.wrap``), by "module.qualname": no import needed
NAMED_FUNCTION_RULES: dict[str, Rule] = {}
TAG_RULES: dict[torch.Tag, Rule] = {}  # ATen overloads without a rule of their own, by tag (pointwise)


def register(
    *keys: type | Callable | str, fix: Fixer | None = None, sizes: bool = False
) -> Callable[[Propagate], Propagate]:
    """Decorator: register ``fn`` as the rule for every key (module type, function, method name, or a
    third-party function's dotted ``module.qualname``); ``fix`` and ``sizes`` as in ``Rule``."""

    def deco(fn: Propagate) -> Propagate:
        for key in keys:
            rule = Rule(fn.__name__.lstrip("_"), fn, fix, sizes)
            if isinstance(key, str) and "." in key:
                NAMED_FUNCTION_RULES[key] = rule
            elif isinstance(key, str):
                METHOD_RULES[key] = rule
            elif isinstance(key, type):
                MODULE_RULES[key] = rule
            else:
                FUNCTION_RULES[key] = rule
        return fn

    return deco


def register_tag(tag: torch.Tag, fix: Fixer | None = None) -> Callable[[Propagate], Propagate]:
    """Decorator: ``fn`` is the rule for every ATen overload tagged ``tag`` that has no rule of its own."""

    def deco(fn: Propagate) -> Propagate:
        TAG_RULES[tag] = Rule(fn.__name__.lstrip("_"), fn, fix)
        return fn

    return deco


def lookup(node: fx.Node, gm: fx.GraphModule) -> Rule | None:
    """The rule for ``node`` or ``None`` (a boundary).

    A module subclass only inherits its parent's rule when it does not override
    ``forward``: a custom forward is unknown code. An ATen overload without a rule of its
    own takes the rule of its first registered tag (``torch.Tag.pointwise``: element-wise).
    """
    if node.op == "call_function":
        rule = FUNCTION_RULES.get(node.target)
        if rule is None and isinstance(node.target, torch._ops.OpOverload):
            rule = next((TAG_RULES[t] for t in node.target.tags if t in TAG_RULES), None)
        if rule is None:
            name = f"{getattr(node.target, '__module__', '')}.{getattr(node.target, '__qualname__', '')}"
            rule = NAMED_FUNCTION_RULES.get(name)
        return rule
    if node.op == "call_method":
        return METHOD_RULES.get(node.target)
    if node.op == "call_module":
        mod_type = type(gm.get_submodule(node.target))
        if mod_type in MODULE_RULES:
            return MODULE_RULES[mod_type]
        for base in mod_type.__mro__[1:]:
            if base in MODULE_RULES and mod_type.forward is base.forward:
                return MODULE_RULES[base]
            if base is nn.Module:
                break
    return None


def module_fixer(mod: nn.Module) -> Fixer | None:
    """The fixer of the first registered type in ``type(mod)``'s MRO that has one.

    Unlike ``lookup`` this ignores ``forward`` overrides: any instance of a layer type
    holds that type's width attributes, and they must follow its sliced parameters.
    """
    for base in type(mod).__mro__:
        rule = MODULE_RULES.get(base)
        if rule is not None and rule.fix is not None:
            return rule.fix
    return None


def is_tensor_meta(meta: object) -> bool:
    """Whether a ShapeProp ``tensor_meta`` entry describes a single tensor."""
    return hasattr(meta, "shape") and hasattr(meta, "dtype")


def meta_shape(node: fx.Node) -> tuple[int, ...] | None:
    """The static shape ShapeProp recorded for ``node``, if it is a tensor."""
    meta = node.meta.get("tensor_meta")
    if is_tensor_meta(meta):
        return tuple(int(s) for s in meta.shape)
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
    return None
