"""Fold the tensors a graph computes from constants alone into buffers.

A captured graph often builds tensors that do not depend on its inputs: Bloom's
ALiBi slopes (``pow(base, arange(1, heads + 1))``), a default all-ones attention
mask, a causal mask from ``full`` and ``triu``. To the analyzer such a computed
tensor has a fixed extent (``arange`` cannot be sliced), so a per-head bias made
from it freezes every head it meets. Evaluated once and stored as a buffer, the same
tensor is data like any other buffer: a rule couples its dims and surgery slices it.

Only chains that start at a creation op are folded (a buffer or parameter is
already data a rule can slice); random and side-effecting ops stay. Folding is exact: the graph computes
the same values, one evaluation earlier.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import fx


def _is_random(node: fx.Node) -> bool:
    """Whether the op draws random numbers (``rand*``, ``dropout``, ``bernoulli``, ...): never folded."""
    tags = getattr(node.target, "tags", ())
    if torch.Tag.nondeterministic_seeded in tags:
        return True
    name = getattr(node.target, "__name__", str(node.target))
    return any(word in name for word in ("rand", "dropout", "bernoulli", "multinomial", "normal"))


# Factories whose values are the same at every position: nothing to slice per channel, so they
# stay in the graph as fixed-extent tensors (a default all-ones mask keeps its batch dim fixed).
_UNIFORM = ("ones", "zeros", "full", "empty")
UNTIE_BYTES = 1 << 20
"""Largest chain of folded values copied per consumer (``_untie``): 1 MiB."""


def _is_uniform(node: fx.Node) -> bool:
    name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
    return name.removeprefix("new_").removesuffix("_like") in _UNIFORM


def _is_meta(node: fx.Node) -> bool:
    """``x.device`` / ``x.dtype`` on an fx graph: the same for every input the model can run on (a dtype
    only where shapes were recorded, which is where it is read from)."""
    if not (node.op == "call_function" and node.target is getattr and isinstance(node.args[0], fx.Node)):
        return False
    return node.args[1] == "device" or (
        node.args[1] == "dtype" and hasattr(node.args[0].meta.get("tensor_meta"), "dtype")
    )


def _constant_nodes(gm: fx.GraphModule) -> dict[fx.Node, bool]:
    """Node → whether it is folded: a creation op (not a uniform fill, not random) or a pure op on one folded node.

    Chains start at creation ops only: a buffer is already data a rule can slice. Ops
    that combine several tensors stay in the graph even when all their inputs are
    constant: a per-head slope times a per-position distance is a coupling the rules
    must see, and folding the product would hide which dim carries the heads.
    """
    constant: dict[fx.Node, bool] = {}
    for node in gm.graph.nodes:
        if _is_meta(node):
            constant[node] = True
        elif node.op == "call_function":
            inputs = [a for a in node.all_input_nodes if not _is_meta(a)]
            constant[node] = (
                len(inputs) <= 1
                and all(constant.get(a, False) for a in inputs)
                and not node.is_impure()
                and not _is_random(node)
                and not _is_uniform(node)
            )
        else:
            constant[node] = False
    return constant


def _meta_value(gm: fx.GraphModule, node: fx.Node) -> Any:
    """The device (the model's: inputs must be on it) or the recorded dtype of ``node``'s tensor."""
    if node.args[1] == "dtype":
        return node.args[0].meta["tensor_meta"].dtype
    return next(iter(gm.parameters()), next(iter(gm.buffers()), torch.empty(0))).device


def _evaluate(gm: fx.GraphModule, constant: dict[fx.Node, bool]) -> dict[fx.Node, Any]:
    """The values of the constant nodes, computed in graph order."""
    env: dict[fx.Node, Any] = {}
    with torch.no_grad():
        for node, is_constant in constant.items():
            if not is_constant:
                continue
            if _is_meta(node):
                env[node] = _meta_value(gm, node)
                continue
            args = fx.node.map_arg(node.args, env.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
            env[node] = node.target(*args, **kwargs)
    return env


def fold_constants(gm: fx.GraphModule) -> list[str]:
    """Replace every computed constant tensor that feeds the rest of the graph by a buffer, in place.

    Returns the new buffers' names. A chain of one-input ops from a creation op
    (``arange``, ``torch.tensor``) becomes one buffer; small chains read by several
    consumers are then copied per consumer (``_untie``).
    """
    constant = _constant_nodes(gm)
    frontier = [
        node
        for node, is_constant in constant.items()
        if is_constant and node.op == "call_function" and any(not constant[u] for u in node.users)
    ]
    if not frontier:
        return []
    values = _evaluate(gm, constant)
    folded = []
    for node in frontier:
        value = values[node]
        if not isinstance(value, torch.Tensor):
            continue
        name = f"_folded_{node.name}"
        while hasattr(gm, name):
            name += "_"
        gm.register_buffer(name, value.detach().clone())
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(name)
        attr.meta.update(node.meta)
        node.replace_all_uses_with(attr)
        folded.append(attr)
    for node in reversed(list(constant)):
        if constant[node] and not node.users:
            gm.graph.erase_node(node)
    parameters = {name for name, _ in gm.named_parameters()}
    pending = list(folded)
    while pending:  # a copied chain may fan out again further on (a bias masked, then read by every layer)
        pending.extend(_untie(gm, pending.pop(), parameters))
    gm.graph.lint()
    gm.recompile()
    return [attr.target for attr in folded]


def _data_users(node: fx.Node) -> list[fx.Node]:
    """Users that consume the value: not a check with no result (``_assert_tensor_metadata``), not ``x.size()``."""
    return [
        u
        for u in node.users
        if (u.users or not (u.op == "call_function" and u.is_impure()))
        and not (u.op == "call_method" and u.target in ("size", "dim"))
    ]


# ATen ops that copy or convert without being tagged pointwise or views
_GLUE = ("_unsafe_view", "_to_copy", "copy", "clone")
# the same on fx graphs: methods and functions that view, convert or combine element by element
_FX_GLUE_METHODS = {"view", "reshape", "unsqueeze", "squeeze", "expand", "to", "transpose", "permute", "contiguous",
                    "clone", "float", "half", "bfloat16", "type_as", "flatten", "mul", "add", "sub", "div", "neg",
                    "masked_fill"}  # fmt: skip
_FX_GLUE_FUNCTIONS = {operator.mul, operator.add, operator.sub, operator.truediv, operator.neg, operator.getitem,
                      torch.mul, torch.add, torch.sub, torch.div, torch.pow, torch.unsqueeze, torch.reshape,
                      torch.masked_fill, torch.where}  # fmt: skip


def _is_glue(node: fx.Node, parameters: set[str]) -> bool:
    """A pure view or element-wise op reading no parameter: cheap to copy, and copying it ties nothing."""
    if any(a.op == "get_attr" and a.target in parameters for a in node.all_input_nodes):
        return False
    target = node.target
    if node.op == "call_method":  # fx spelling
        return target in _FX_GLUE_METHODS
    if node.op != "call_function" or node.is_impure():
        return False
    if not isinstance(target, torch._ops.OpOverload):
        return target in _FX_GLUE_FUNCTIONS
    return target.is_view or torch.Tag.pointwise in target.tags or target.__name__.split(".")[0] in _GLUE


def _nbytes(node: fx.Node) -> int | None:
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    if isinstance(val, torch.Tensor):
        return val.numel() * val.element_size()
    if hasattr(val, "shape") and hasattr(val, "dtype"):  # fx's TensorMetadata
        return math.prod(val.shape) * torch.empty(0, dtype=val.dtype).element_size()
    return None


def _untie(gm: fx.GraphModule, attr: fx.Node, parameters: set[str], longest: int = 16) -> list[fx.Node]:
    """Give each consumer of a folded buffer its own copy of the ops between them.

    Bloom's ALiBi bias is computed once and read by every layer: shared, it would make
    one head group of all layers (dropping a head everywhere at once). The chain from
    the buffer to where it fans out (views and element-wise ops only) is copied per
    consumer, buffer included, when its values take at most ``UNTIE_BYTES`` (recorded sizes):
    a bias of heads x positions is copied, a causal mask of positions² at long lengths is not.
    Returns the new buffers' nodes, and ``attr`` again when it was split (its chain may
    fan out again further on).
    """
    path, node = [attr], attr
    while len(_data_users(node)) == 1 and len(path) < longest:
        (node,) = _data_users(node)
        if not _is_glue(node, parameters):
            return []
        path.append(node)
    users = _data_users(node)
    sizes = [_nbytes(n) for n in path]
    if len(users) < 2 or None in sizes or sum(sizes) > UNTIE_BYTES:
        return []
    value = getattr(gm, attr.target)
    split = [attr]
    for user in users[1:]:
        name = f"{attr.target}_{user.name}"
        while hasattr(gm, name):
            name += "_"
        gm.register_buffer(name, value.clone())
        copies: dict[fx.Node, fx.Node] = {}
        with gm.graph.inserting_before(user):
            copies[attr] = gm.graph.get_attr(name)
            copies[attr].meta.update(attr.meta)
            for n in path[1:]:
                copies[n] = gm.graph.node_copy(n, lambda a, c=copies: c.get(a, a))
        user.replace_input_with(node, copies[node])
        split.append(copies[attr])
    return split
