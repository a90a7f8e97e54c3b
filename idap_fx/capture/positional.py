"""Keyword arguments of torch functions moved to their positions, once, at capture.

The op rules read a call's operands by position (``node.args[0]``); research and Hugging Face
code also writes ``torch.flatten(input=x, start_dim=1)``, ``F.linear(input=x, weight=w)`` or
``F.scaled_dot_product_attention(query=q, key=k, value=v)``, which left those rules declining
and the channels frozen. ``positional_arguments`` rewrites such calls with the same values in
positional form (skipped arguments take their defaults), using torch's own schemas; a call whose
overloads disagree on the positions is left as written.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import fx
from torch.fx.operator_schemas import get_signature_for_torch_op

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _arrangement(sig: inspect.Signature, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
    """``(args, kwargs)`` with every keyword that has a position moved there under ``sig``, or None."""
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError:
        return None
    positional = [p for p in sig.parameters.values() if p.kind in _POSITIONAL]
    given = [i for i, p in enumerate(positional) if p.name in bound.arguments]
    new_args = []
    for p in positional[: max(given, default=-1) + 1]:
        if p.name in bound.arguments:
            new_args.append(bound.arguments[p.name])
        elif p.default is not inspect.Parameter.empty:
            new_args.append(p.default)
        else:
            return None
    moved = {p.name for p in positional[: len(new_args)]}
    return tuple(new_args), {k: v for k, v in kwargs.items() if k not in moved}


def positional_arguments(gm: fx.GraphModule) -> int:
    """Move keyword operands of torch calls in ``gm`` to their positions (in place); return how many calls."""
    count = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or not node.kwargs:
            continue
        signatures = get_signature_for_torch_op(node.target) or []
        found = [
            a for sig in signatures if (a := _arrangement(sig, node.args, dict(node.kwargs))) is not None
        ]
        if not found or any(a != found[0] for a in found[1:]):
            continue  # not a torch op, or overloads that place the arguments differently
        args, kwargs = found[0]
        if args != node.args:
            node.args, node.kwargs = args, kwargs
            count += 1
    if count:
        gm.recompile()
    return count
