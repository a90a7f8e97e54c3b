"""Measured model cost: multiply-accumulates (torch's own FLOP counter), parameter counts, and a
bit-exact fingerprint (two runs that built the same model are measured once).

MACs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2, the
convention of the IDAP++ tables) on one forward over the example inputs. The forward
runs on the ``meta`` device when the graph allows it (no arithmetic, so counting
ResNet-50 costs milliseconds) and falls back to a real CPU forward when it does not.
Grouped products (Mixture-of-Experts layers: every token row meets one expert's matrix) have
no formula in torch's counter; ``_grouped_mm_flops`` supplies it.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _to_meta(value: Any) -> Any:
    return torch.empty_like(value, device="meta") if isinstance(value, torch.Tensor) else value


def _grouped_mm_flops(x_shape: Any, w_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of a grouped product: each output element is a ``K``-long dot product (``K`` = x's last dim)."""
    return 2 * math.prod(out_shape) * x_shape[-1]


def _extra_formulas() -> dict[Any, Any]:
    """Formulas for ops torch's counter lacks: ``aten._grouped_mm`` and transformers 5's fallback op."""
    ops = [torch.ops.aten._grouped_mm]
    if hasattr(
        torch.ops.transformers, "grouped_mm_fallback"
    ):  # registered once transformers' MoE is imported
        ops.append(torch.ops.transformers.grouped_mm_fallback)
    return dict.fromkeys(ops, _grouped_mm_flops)


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one forward of ``model`` on ``example_inputs``."""
    inputs = _as_tuple(example_inputs)
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    counter = FlopCounterMode(display=False, custom_mapping=_extra_formulas())
    try:
        meta_state = {k: _to_meta(v) for k, v in state.items()}
        with torch.no_grad(), counter:
            functional_call(model, meta_state, tree_map(_to_meta, inputs))
    except Exception:  # graphs that build real tensors internally (arange, ...) cannot run on meta
        counter = FlopCounterMode(display=False, custom_mapping=_extra_formulas())
        with torch.no_grad(), counter:
            model(*inputs)
    return int(counter.get_total_flops()) // 2


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (tied parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def fingerprint(model: nn.Module) -> str:
    """sha256 over the forward's code and the state dict's names, dtypes, shapes and bytes."""
    h = hashlib.sha256(str(getattr(model, "code", type(model).__qualname__)).encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        flat = t.detach().cpu().contiguous().reshape(-1)
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
