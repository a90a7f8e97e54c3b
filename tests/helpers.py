"""Shared test helpers: random pruning plans, the oracle's error measure, model fingerprints, and the
small net / calibration / ``Guard`` of the hardening cases (docs/hardening.md)."""

from __future__ import annotations

import copy
import hashlib
import math
import operator
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

import idap_fx


def random_plan(dg: idap_fx.DependencyGraph, ratio: float = 0.3, seed: int = 0) -> dict[str, list[int]]:
    """Remove ``ratio`` of the units of every prunable group, chosen at random (reproducible by ``seed``).

    Every group keeps at least one unit, and so does every part in ``group.parts`` (the
    split/chunk pieces each consumed by its own layer): a fully removed part gets one
    unit back. Groups that would lose nothing are left out of the plan.
    """
    rng = np.random.default_rng(seed)
    plan: dict[str, list[int]] = {}
    for g in dg.prunable:
        k = min(int(round(ratio * g.size)), g.size - 1)
        if k <= 0:
            continue
        removed = {int(i) for i in rng.choice(g.size, size=k, replace=False)}
        for part in getattr(g, "parts", None) or []:
            units = [int(u) for u in np.asarray(part).ravel()]
            if units and all(u in removed for u in units):
                removed.discard(int(rng.choice(units)))
        if removed:
            plan[g.id] = sorted(removed)
    return plan


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        return [t for v in value for t in _tensors(v)]
    return []


def rel_err(a: Any, b: Any) -> float:
    """Max abs difference over max abs value (of both), across every tensor in two matching outputs."""
    ta, tb = _tensors(a), _tensors(b)
    assert len(ta) == len(tb), f"outputs hold {len(ta)} vs {len(tb)} tensors"
    diff, scale = 0.0, 0.0
    for x, y in zip(ta, tb, strict=True):
        assert x.shape == y.shape, f"shape {tuple(x.shape)} vs {tuple(y.shape)}"
        x, y = x.detach().double(), y.detach().double()
        if x.numel() == 0:
            continue
        d = (x - y).abs().max().item()
        diff = max(diff, d if not math.isnan(d) else math.inf)
        scale = max(scale, x.abs().max().item(), y.abs().max().item())
    if diff == 0.0:
        return 0.0
    return diff / scale if scale > 0 else math.inf


def out_shapes(value: Any) -> list[tuple[int, ...]]:
    """The shapes of every tensor in a (possibly nested) model output."""
    return [tuple(t.shape) for t in _tensors(value)]


def state_hash(module: nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes and raw bytes): a bit-exact fingerprint."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        flat = t.detach().cpu().contiguous().reshape(-1)
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def expected_param_shapes(
    gm: nn.Module, expected: Mapping[str, tuple[tuple[int, int], ...]]
) -> dict[str, tuple[int, ...]]:
    """Every state-dict tensor's shape once ``expected`` (``dg.expected_numel(plan)``) is applied."""
    shapes = {}
    for name, t in gm.state_dict(keep_vars=True).items():
        shape = list(t.shape)
        for dim, kept in expected.get(name, ()):
            shape[dim] = kept
        shapes[name] = tuple(shape)
    return shapes


def plan_is_exact(dg: idap_fx.DependencyGraph, plan: Mapping[str, Any]) -> bool:
    """Whether every group the plan touches is exact (the prune == mask oracle applies)."""
    return all(dg.group(gid).exact for gid, idx in plan.items() if len(idx))


def zero_branch(gm: torch.fx.GraphModule, cand: Any) -> torch.fx.GraphModule:
    """The stage-2 oracle: ``gm`` with a residual candidate's branch output multiplied by zero before its add."""
    z = copy.deepcopy(gm)
    by_name = {n.name: n for n in z.graph.nodes}
    add, out = by_name[cand.exit], by_name[cand.nodes[-1]]
    with z.graph.inserting_before(add):
        zero = z.graph.call_function(operator.mul, (out, 0.0))
    add.replace_input_with(out, zero)
    z.recompile()
    return z


# --- the hardening cases' small model, data and caller guard ---

SMALL_X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def small_calibration(n: int = 3, shape: tuple[int, ...] = (2, 3, 8, 8)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def small_net() -> nn.Module:
    """conv-BN-ReLU(inplace) -> conv -> pool -> linear: two prunable groups, milliseconds per run."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()


class Guard:
    """The caller's model and tensors, fingerprinted before a call; ``intact()`` checks them after."""

    def __init__(self, model: nn.Module, *tensors: torch.Tensor) -> None:
        self.model = model
        self.hash = state_hash(model)
        self.tensors = [(t, t.clone()) for t in tensors]
        self.x = tensors[0] if tensors else SMALL_X
        with torch.no_grad():
            self.y = model(self.x.clone())

    def intact(self) -> None:
        assert state_hash(self.model) == self.hash, "the caller's model was modified"
        for t, copy_ in self.tensors:
            assert torch.equal(t, copy_), "the caller's tensor was modified"
        with torch.no_grad():
            assert torch.equal(self.model(self.x.clone()), self.y), "the caller's model no longer works"


def optimize_small(model: nn.Module, **kw: Any) -> idap_fx.OptimizeResult:
    kw = {"calibration": small_calibration(), "target_macs": 0.5, "budget": None, "quiet": True} | kw
    return idap_fx.optimize(model, SMALL_X, **kw)


def raising(exc: BaseException) -> Callable[..., Any]:
    """A callback that raises ``exc`` whatever it is given."""

    def callback(*_: Any) -> Any:
        raise exc

    return callback


class LastHiddenState(nn.Module):
    """A Hugging Face model called with ``input_ids`` (and ``attention_mask``) that returns its last hidden
    state: one tensor, as ``torch.export`` and the ONNX parity check take it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        extra = {} if mask is None else {"attention_mask": mask}
        return self.model(input_ids=ids, **extra).last_hidden_state


class MultiQueryHeads(nn.Module):
    """Falcon-7B's multi-query attention: a fused (heads + 2, head_dim) projection, the query heads sliced
    off, the one key and value head picked by list index (``aten.index`` with a constant once exported)
    and broadcast against every query head; ``pick`` names them by absolute or end-relative position."""

    def __init__(self, pick: tuple[int, int]) -> None:
        super().__init__()
        self.qkv, self.out, self.pick = nn.Linear(8, 6 * 2), nn.Linear(8, 8), pick

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        fused = self.qkv(x).view(b, t, 6, 2)
        q = fused[..., :4, :].transpose(1, 2)
        k = fused[..., [self.pick[0]], :].transpose(1, 2)
        v = fused[..., [self.pick[1]], :].transpose(1, 2)
        att = (q @ k.transpose(-1, -2)).softmax(-1) @ v
        return self.out(att.transpose(1, 2).reshape(b, t, 8))
