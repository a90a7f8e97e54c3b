"""Size arguments of view / reshape / expand: which of them pruning may change, and how they are rewritten.

A size is a literal, ``-1``, or a value computed in the graph (``x.size(1)``, ``b * 4``).
The analysis freezes channels whose extent a size would pin (read off another tensor's
channels, or a fixed value on a dim that shrinks); the fixers run after pruning and
write the new sizes: literals take the new widths, a single foreign size becomes ``-1``,
and an expression with a literal head count (``batch * 4``, ``n // 4``) gets the kept count.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import numpy as np
from torch import fx

from idap_fx.graph.layout import Axis, Dynamic, Layout, all_ids
from idap_fx.graph.ops.registry import Rewrite


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` of ``node``, else its keyword ``name``, else ``default``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def shape_args(node: fx.Node) -> list[Any]:
    rest = list(node.args[1:]) if node.op == "call_method" else [arg(node, 1, "shape")]
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        rest = list(rest[0])
    return rest


def _foreign_dims(node: fx.Node, value_of: Callable[[Any], Any], src: Layout, out: Any = None) -> list[int]:
    """Size arguments read off channels that are not this tensor's own, and (given the output layout
    ``out``) fixed graph values on a dim whose channels shrink (Swin v2's ``reshape(B_, N, C)`` with ``C``
    read off an input whose channels are frozen, on heads that are not)."""
    own = set(all_ids(src).tolist())
    args = shape_args(node)
    aligned = isinstance(out, Layout) and len(args) == out.ndim
    dims = []
    for d, arg in enumerate(args):
        value = value_of(arg)
        if (
            isinstance(value, Dynamic)
            and not value.taint.size
            and aligned
            and (ax := out.axis_of(d)) is not None
        ):
            if (len(ax.dims) == 1 or ax.free == d) and _literal_factor(arg) != _units_along(ax, d):
                dims.append(d)
            continue
        if not isinstance(value, Dynamic) or not value.taint.size:
            continue
        if value.shape_of is src or (value.shape_of is None and set(value.taint.tolist()) <= own):
            continue
        dims.append(d)
    return dims


def _literal_factor(size: Any) -> int | None:
    """``c`` of a size computed as ``n * c`` with ``c`` an int literal (``batch * num_heads``), else None."""
    if not (isinstance(size, fx.Node) and size.op == "call_function" and size.target is operator.mul):
        return None
    ints = [a for a in size.args if isinstance(a, int) and not isinstance(a, bool)]
    return ints[0] if len(ints) == 1 and len(size.args) == 2 else None


def _units_along(ax: Axis, d: int) -> int:
    """How many different units lie along dim ``d`` of a (free-dim) axis: a merged batch x heads dim has
    as many as heads, each repeated per batch row."""
    line = np.moveaxis(ax.ids, ax.dims.index(d), 0).reshape(ax.ids.shape[ax.dims.index(d)], -1)[:, 0]
    return len(np.unique(line))


def inferable_dim(
    node: fx.Node, value_of: Callable[[Any], Any], src: Layout, rank: int, out: Any = None
) -> int | None:
    """The one view/reshape size read off another tensor (CLIP's ``reshape(b, t, embed_dim)`` with
    ``embed_dim`` from the residual stream) when no other size is ``-1``: after pruning it is written
    as ``-1``, which reshape infers exactly, so neither tensor needs to freeze."""
    args = shape_args(node)
    foreign = _foreign_dims(node, value_of, src, out)
    if len(args) != rank or len(foreign) != 1 or any(isinstance(a, int) and a == -1 for a in args):
        return None
    return foreign[0]


def check_size_args(ctx, node: fx.Node, src: Layout, out: Layout, infer: bool = False) -> None:
    """Sizes read off another tensor must not change under pruning unless they follow this one.

    ``y.view(b, x.size(1), -1)`` ties ``x``'s channels to ``y``'s: if they are not the
    same channels, both are frozen rather than letting the two drift apart. With ``infer``
    (view / reshape) a single such size becomes ``-1`` after pruning instead (``inferable_dim``).
    """
    args = shape_args(node)
    skip = inferable_dim(node, ctx.value, src, len(ctx.shape(node)), out) if infer else None
    for d in _foreign_dims(node, ctx.value, src, out):
        if d == skip or _same_extent(ctx, node, args[d], out, d):
            continue
        value = ctx.value(args[d])
        if value.taint.size:
            ctx.coupling.freeze(value.taint, f"{node.name}: takes a size from another tensor")
        if len(args) == len(ctx.shape(node)) and (ax := out.axis_of(d)) is not None:
            ctx.coupling.freeze(ax.ids, f"{node.name}: size set from another tensor")
        elif len(args) != len(ctx.shape(node)):
            ctx.coupling.freeze(all_ids(out), f"{node.name}: shape set from another tensor")


def _same_extent(ctx, node: fx.Node, size: Any, out: Layout, d: int) -> bool:
    """A size read off another tensor's whole channel dim, set on an output dim that is one whole channel
    axis of as many units (Swin v2 CR's ``windows.view(-1, ws, ws, C)`` with ``C`` from the block input):
    the two axes are coupled, so they shrink together and the size stays right."""
    value = ctx.value(size)
    if not isinstance(value, Dynamic) or value.size_of is None or len(shape_args(node)) != out.ndim:
        return False
    other = value.size_of[0].axis_of(value.size_of[1])
    mine = out.axis_of(d)
    if other is None or mine is None or other.dims != (value.size_of[1],) or mine.dims != (d,):
        return False
    if len(other.ids) != len(mine.ids):
        return False
    ctx.coupling.union(mine.ids, other.ids, f"{node.name}: size read off a coupled channel dim")
    return True


def _size_args(node: fx.Node) -> tuple[list[Any], Callable[[list[Any]], tuple]]:
    """The size arguments of a view/reshape/expand node, and how to write new ones back."""
    nested = node.op == "call_method" and len(node.args) == 2 and isinstance(node.args[1], (list, tuple))
    if node.op == "call_method" and not nested:
        return list(node.args[1:]), lambda s: (node.args[0], *s)
    if node.op == "call_method":
        return list(node.args[1]), lambda s: (node.args[0], type(node.args[1])(s))
    return list(node.args[1]), lambda s: (node.args[0], type(node.args[1])(s), *node.args[2:])


_ARITHMETIC = (operator.mul, operator.floordiv, operator.add, operator.sub)


def _new_size(rw: Rewrite, size: Any) -> Any:
    """What a size expression (``x.size(0) // 4``, ``b * 4``) evaluates to once pruned; None if unknown."""
    if isinstance(size, int) or not isinstance(size, fx.Node):
        return size
    name = size.target if size.op == "call_method" else getattr(size.target, "__name__", "")
    if name == "size" and isinstance(size.args[0], fx.Node) and "tensor_meta" in size.args[0].meta:
        shape = rw.shape(size.args[0])
        return shape if len(size.args) == 1 else shape[size.args[1]]
    if size.op == "call_function" and size.target is getattr and size.args[1] == "shape":
        return rw.shape(size.args[0]) if "tensor_meta" in size.args[0].meta else None
    if size.op == "call_function" and size.target is operator.getitem:
        seq = _new_size(rw, size.args[0])
        return seq[size.args[1]] if isinstance(seq, (list, tuple)) else None
    if size.op == "call_function" and size.target in _ARITHMETIC:
        a, b = (_new_size(rw, x) for x in size.args)
        return size.target(a, b) if isinstance(a, int) and isinstance(b, int) else None
    return None


def _repair_size(rw: Rewrite, node: fx.Node, size: Any, want: int) -> None:
    """Make ``n * c`` or ``n // c`` (``c`` an int literal) evaluate to ``want`` after pruning by changing ``c``:
    ``batch * num_heads`` and ``x.size(0) // num_heads`` with the head count written as a number. An
    expression ``node`` shares with other users is copied first, so theirs keeps its value."""
    if not (isinstance(size, fx.Node) and size.op == "call_function" and len(size.args) == 2):
        return
    if size.target not in (operator.mul, operator.floordiv) or _new_size(rw, size) in (None, want):
        return
    k = next((i for i, a in enumerate(size.args) if isinstance(a, int) and not isinstance(a, bool)), None)
    if k is None or (size.target is operator.floordiv and k != 1):
        return
    n = _new_size(rw, size.args[1 - k])
    if not isinstance(n, int) or n <= 0:
        return
    if size.target is operator.mul and want % n == 0:
        c = want // n
    elif size.target is operator.floordiv and want > 0 and n % want == 0:
        c = n // want
    else:
        return
    if len(size.users) > 1:
        with node.graph.inserting_before(node):
            copy = node.graph.node_copy(size)
        node.replace_input_with(size, copy)
        size = copy
    size.args = tuple(c if i == k else a for i, a in enumerate(size.args))


def fix_shape_args(rw: Rewrite, node: fx.Node) -> None:
    """Literal sizes in view/reshape/expand follow the new widths; -1 and graph values adapt, and sizes
    computed with a literal head count (``b * 4``, ``n // 4``) get the new count.

    The analysis lets ops with this fixer take sizes that pruning changes.
    """
    new = rw.shape(node)
    sizes, rebuild = _size_args(node)
    if len(sizes) != len(new):
        return
    for d, size in enumerate(sizes):
        _repair_size(rw, node, size, new[d])
    sizes, rebuild = _size_args(node)
    changed = [new[d] if isinstance(s, int) and s > 0 and s != new[d] else s for d, s in enumerate(sizes)]
    if changed != sizes:
        node.args = rebuild(changed)


def fix_reshape_args(rw: Rewrite, node: fx.Node) -> None:
    """``fix_shape_args``, after writing the one size read off another tensor as ``-1`` (``inferable_dim``)."""
    d = inferable_dim(node, rw.value, rw.value(node.args[0]), len(rw.shape(node)), rw.value(node))
    if d is not None:
        sizes, rebuild = _size_args(node)
        node.args = rebuild([-1 if k == d else s for k, s in enumerate(sizes)])
    fix_shape_args(rw, node)


def shape_of(size: Any) -> fx.Node | None:
    """The tensor whose whole shape ``size`` is (``t.shape``, ``t.size()``), else None."""
    if not isinstance(size, fx.Node):
        return None
    if size.op == "call_function" and size.target is getattr and size.args[1] == "shape":
        return size.args[0]
    if size.op == "call_method" and size.target == "size" and len(size.args) == 1 and not size.kwargs:
        return size.args[0]
    return None


def fix_broadcast_to(rw: Rewrite, node: fx.Node) -> None:
    """Literal sizes follow the new widths (as ``expand``); a shape read off a tensor adapts by itself."""
    if not isinstance(node.args[1], fx.Node):
        fix_shape_args(rw, node)
