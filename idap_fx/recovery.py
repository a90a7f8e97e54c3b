"""Recovery after a pruning step (method notes §5).

* ``compensate`` — retraining-free: the mean contribution of every removed input channel
  of a conv (groups = 1) or linear consumer is folded into that consumer's bias, so the
  layer's expected output is unchanged (FLAP's bias compensation). Needs no data beyond
  the calibration statistics already streamed for scoring.
* ``distill`` — the built-in recipe when a training loader is given: the previous step's
  model is the teacher; loss = task loss (cross-entropy with labels, else KL to the
  teacher's soft outputs, MSE for non-logit outputs) + 0.5 · L1 on three intermediate
  feature maps (a learned 1×1 adapter where widths differ); AdamW, lr 1e-4 (the authors used
  1e-3; see docs/architecture.md), wd 1e-4, BatchNorm statistics frozen.
  Activation-agnostic (ReLU, GELU, SiLU alike). Under ``torch.distributed`` the student
  is wrapped in ``DistributedDataParallel`` and the loader gets a ``DistributedSampler``.
* ``run_fine_tune`` — a user ``fine_tune(model, teacher)`` callback, checked not to have
  changed any parameter's shape.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from idap_fx.dependency import DependencyGraph, Plan
from idap_fx.errors import IdapError
from idap_fx.stats import Site, batch_args


def compensate(
    before: fx.GraphModule, after: fx.GraphModule, dg: DependencyGraph, plan: Plan, sites: list[Site]
) -> int:
    """Fold removed channels' mean input into consumers' biases of ``after``; return layers changed."""
    removed = dg.removed_elements(plan)
    nodes = {n.name: n for n in before.graph.nodes}
    site_of = {(s.node, s.slot.numel()): s for s in sites if not s.probe}
    changed = 0
    for m in dg.members:
        node = nodes.get(m.node)
        if m.role != "in" or m.dim != 1 or node is None or node.op != "call_module":
            continue
        mod = before.get_submodule(node.target)
        if (
            not isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
            or getattr(mod, "groups", 1) != 1
        ):
            continue
        arg = node.args[0]
        layout = dg.layouts.get(arg.name) if isinstance(arg, fx.Node) else None
        site = site_of.get((arg.name, mod.weight.shape[1])) if layout is not None else None
        channel_dim = (
            1 if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else getattr(layout, "ndim", 0) - 1
        )
        axis = None if layout is None else layout.axis_of(channel_dim)
        if site is None or axis is None or axis.ids.size != mod.weight.shape[1]:
            continue
        gone = torch.from_numpy(removed[axis.ids.ravel()])
        if not gone.any():
            continue
        w = mod.weight.detach().double()
        w_in = w.sum(dim=tuple(range(2, w.dim()))) if w.dim() > 2 else w
        delta = w_in[:, gone] @ site.channel_mean()[gone]
        out_member = next(
            (o for o in dg.members if o.node == m.node and o.role == "out" and o.dim == 0), None
        )
        if out_member is not None:
            delta = delta[torch.from_numpy(~removed[out_member.ids])]
        target = after.get_submodule(node.target)
        delta = delta.to(target.weight.dtype)
        with torch.no_grad():
            if target.bias is None:
                target.bias = nn.Parameter(delta.clone())
            else:
                target.bias.add_(delta)
        changed += 1
    return changed


def train_with_frozen_batchnorm(model: nn.Module) -> None:
    """Training mode, except BatchNorm statistics: short runs on small batches would ruin them."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def run_fine_tune(
    fine_tune: Callable[[nn.Module, nn.Module], Any], model: fx.GraphModule, teacher: nn.Module
) -> fx.GraphModule:
    """Call the user's ``fine_tune(model, teacher)``; the model (or the one it returns) must keep its shapes."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        result = fine_tune(model, teacher)
    except Exception as exc:
        raise IdapError(f"the fine_tune callback raised {type(exc).__name__}: {exc}") from exc
    out = result if isinstance(result, nn.Module) else model
    if out is not model and set(out.state_dict()) != set(shapes):
        raise IdapError(
            f"the fine_tune callback returned a {type(out).__name__} with other parameters than the pruned "
            "model it was given; train the given model in place (or return it)"
        )
    for k, v in out.state_dict().items():
        if shapes.get(k) != tuple(v.shape):
            raise IdapError(
                f"the fine_tune callback changed {k!r} from {shapes.get(k)} to {tuple(v.shape)}; "
                "it must train the pruned model in place, not reshape it"
            )
    return out


def _tap(gm: fx.GraphModule, names: list[str]) -> fx.GraphModule:
    """A GraphModule sharing ``gm``'s modules that also returns the outputs of nodes ``names``."""
    graph = copy.deepcopy(gm.graph)
    by_name = {n.name: n for n in graph.nodes}
    out = next(n for n in graph.nodes if n.op == "output")
    out.args = ((out.args[0], tuple(by_name[n] for n in names)),)
    graph.lint()
    return fx.GraphModule(gm, graph)


def _shape(n: fx.Node) -> tuple[int, ...] | None:
    meta = n.meta.get("tensor_meta")
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def feature_nodes(student: fx.GraphModule, teacher: fx.GraphModule, count: int = 3) -> list[str]:
    """Up to ``count`` intermediate nodes (at 1/4, 1/2, 3/4 depth) present in both graphs with 3-D/4-D outputs."""
    teacher_nodes = {n.name: n for n in teacher.graph.nodes}
    shared = [
        n.name
        for n in student.graph.nodes
        if n.op in ("call_module", "call_function", "call_method")
        and n.name in teacher_nodes
        and (s := _shape(n)) is not None
        and len(s) in (3, 4)
        and (t := _shape(teacher_nodes[n.name])) is not None
        and len(t) == len(s)
    ]
    if not shared:
        return []
    picks = sorted(
        {shared[int(len(shared) * q / (count + 1))] for q in range(1, count + 1)}, key=shared.index
    )
    return picks


def _adapter(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    cs, ct = (
        (student_shape[1], teacher_shape[1])
        if len(student_shape) == 4
        else (student_shape[-1], teacher_shape[-1])
    )
    if cs == ct:
        return nn.Identity()
    return nn.Conv2d(cs, ct, 1) if len(student_shape) == 4 else nn.Linear(cs, ct)


class _StudentWithAdapters(nn.Module):
    """The tapped student and its feature adapters as one module (one DDP wrapper for both)."""

    def __init__(self, student: fx.GraphModule, adapters: nn.ModuleList) -> None:
        super().__init__()
        self.student, self.adapters = student, adapters

    def forward(self, *inputs: Any) -> tuple[Any, list[torch.Tensor]]:
        out, feats = self.student(*inputs)
        return out, [ad(f) for ad, f in zip(self.adapters, feats, strict=True)]


def _loader(train_loader: Iterable[Any]) -> Iterable[Any]:
    """Shard a DataLoader across ranks with a DistributedSampler when running distributed."""
    if not (dist.is_available() and dist.is_initialized()) or not isinstance(train_loader, DataLoader):
        return train_loader
    if isinstance(train_loader.sampler, DistributedSampler):
        return train_loader
    return DataLoader(
        train_loader.dataset,
        batch_size=train_loader.batch_size,
        sampler=DistributedSampler(train_loader.dataset, shuffle=False),
        collate_fn=train_loader.collate_fn,
        num_workers=train_loader.num_workers,
    )


def distill(
    student: fx.GraphModule,
    teacher: fx.GraphModule,
    train_loader: Iterable[Any],
    *,
    steps: int | None = None,
    lr: float = 1e-4,
    weight_decay: float = 1e-4,
    feature_weight: float = 0.5,
    progress: Callable[[Iterable[Any]], Iterable[Any]] = lambda it: it,
) -> fx.GraphModule:
    """Train ``student`` in place to match ``teacher`` (method notes §5); return it."""
    names = feature_nodes(student, teacher)
    nodes_s = {n.name: n for n in student.graph.nodes}
    nodes_t = {n.name: n for n in teacher.graph.nodes}
    adapters = nn.ModuleList(_adapter(_shape(nodes_s[n]), _shape(nodes_t[n])) for n in names)
    tapped_s, tapped_t = _tap(student, names), _tap(teacher, names)
    n_inputs = sum(1 for n in student.graph.nodes if n.op == "placeholder")
    train_module: nn.Module = _StudentWithAdapters(tapped_s, adapters)
    runner: nn.Module = train_module
    if dist.is_available() and dist.is_initialized():
        runner = DistributedDataParallel(train_module)  # adapters' gradients are averaged too
    opt = torch.optim.AdamW(train_module.parameters(), lr=lr, weight_decay=weight_decay)
    train_with_frozen_batchnorm(tapped_s)
    teacher.eval()
    batches = _loader(train_loader)
    iterator = itertools.islice(batches, steps) if steps is not None else batches
    for batch in progress(iterator):
        args = batch_args(batch)
        labels = args[n_inputs] if len(args) > n_inputs else None
        inputs = args[:n_inputs]
        with torch.no_grad():
            out_t, feats_t = tapped_t(*inputs)
        out_s, feats_s = runner(*inputs)
        if isinstance(out_s, torch.Tensor) and out_s.dim() == 2:
            task = F.kl_div(F.log_softmax(out_s, -1), F.softmax(out_t, -1), reduction="batchmean")
            if labels is not None:
                task = task + F.cross_entropy(out_s, labels)
        else:
            leaves_s = [t for t in torch.utils._pytree.tree_leaves(out_s) if isinstance(t, torch.Tensor)]
            leaves_t = [t for t in torch.utils._pytree.tree_leaves(out_t) if isinstance(t, torch.Tensor)]
            task = sum(F.mse_loss(a, b) for a, b in zip(leaves_s, leaves_t, strict=True))
        feat = sum(F.l1_loss(fs, ft) for fs, ft in zip(feats_s, feats_t, strict=True))
        loss = task + feature_weight * feat if names else task
        if not torch.isfinite(loss):
            raise IdapError(
                f"distillation diverged (loss {loss.item()}); lower lr or check the training data"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    student.eval()
    return student


__all__ = ["compensate", "distill", "feature_nodes", "run_fine_tune", "train_with_frozen_batchnorm"]
