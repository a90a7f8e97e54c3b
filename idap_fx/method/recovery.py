"""Recovery after a pruning step (method notes §5), never worse than no recovery on held-out data.

* retraining-free compensation runs first (``idap_fx.method.compensation``).
* ``distill`` — the built-in recipe when a training loader is given: the previous step's
  model is the teacher; loss = KL to the teacher's soft outputs for logits (plus
  cross-entropy when the batches carry labels; MSE on every output tensor for non-logit
  outputs) + 0.5 · L1 on three intermediate feature maps (a learned 1×1 adapter where
  widths differ); AdamW, lr 1e-4 (the authors used 1e-3; see docs/architecture.md), wd
  1e-4, BatchNorm statistics frozen. Activation-agnostic (ReLU, GELU, SiLU alike). Under
  ``torch.distributed`` the student is wrapped in ``DistributedDataParallel`` and the
  loader gets a ``DistributedSampler``.
* ``run_fine_tune`` — a user ``fine_tune(model, teacher)`` callback, checked not to have
  changed any parameter's shape.

Both take a ``measure`` (lower is better, on batches never used for training: in a pass,
distillation's own loss on the budget's held-out batches, ``held_out_loss``; a callback's
output deviation from the unpruned model; or the drop of ``evaluate``). Distillation
measures every ``eval_every`` steps, keeps the best state (the starting one included) and
stops after ``patience`` measurements without improvement: on a few photos, distillation
at lr 1e-4 took even the unpruned MobileNetV2 to 49 % agreement on unseen photos. The
default patience (5) lets a short run (``steps`` given: 5 measurements) go to its end and
keep its best state: with 2, every distillation of ``make demo`` stopped after 8 of its 20
steps, before the held-out loss had turned down, and kept none of them. The
callback's model is measured before and after and the better one is kept, unless the
callback left non-finite weights (a broken callback is reported, not hidden). Each call
returns a ``RecoveryRecord``: what recovery bought.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from idap_fx.errors import DivergedError, IdapError
from idap_fx.method.channel_stats import batch_args
from idap_fx.method.collective import reducer
from idap_fx.method.distill_features import StudentWithAdapters, adapter, feature_nodes, node_shape, tap


def train_with_frozen_batchnorm(model: nn.Module) -> None:
    """Training mode, except BatchNorm statistics: short runs on small batches would ruin them."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


@dataclass
class RecoveryRecord:
    """What one recovery did: the held-out measure (lower is better) before and after, and where it stopped.

    ``before`` / ``after`` are None when no measure was given. ``steps`` counts training
    steps run (None for a user callback); ``kept_step`` is the step whose weights were
    kept (0: the starting weights).
    """

    method: str
    before: float | None
    after: float | None
    steps: int | None
    kept_step: int | None
    stop: str


class _BestState:
    """The best weights of ``model`` seen so far on ``measure`` (lower is better), the starting ones included."""

    def __init__(self, model: nn.Module, measure: Callable[[nn.Module], float] | None, patience: int) -> None:
        self.model, self.measure, self.patience = model, measure, patience
        self.first = self.best = self._measure()
        self.best_step, self.misses = 0, 0
        self.state = self._snapshot()

    def _measure(self) -> float | None:
        if self.measure is None:
            return None
        modes = [(m, m.training) for m in self.model.modules()]  # e.g. frozen BatchNorm inside training
        self.model.eval()
        value = float(self.measure(self.model))
        for m, training in modes:
            m.training = training
        return value if math.isfinite(value) else math.inf

    def _snapshot(self) -> dict[str, torch.Tensor] | None:
        if self.measure is None:
            return None
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def update(self, step: int) -> bool:
        """Measure at ``step``; keep the weights if better. True when patience has run out."""
        value = self._measure()
        if value is None:
            return False
        if value < self.best:
            self.best, self.best_step, self.misses, self.state = value, step, 0, self._snapshot()
        else:
            self.misses += 1
        return self.misses >= self.patience

    def restore(self) -> None:
        """Load the best weights seen back into the model."""
        if self.state is not None:
            self.model.load_state_dict(self.state)


def run_fine_tune(
    fine_tune: Callable[[nn.Module, nn.Module], Any],
    model: fx.GraphModule,
    teacher: nn.Module,
    measure: Callable[[nn.Module], float] | None = None,
) -> tuple[fx.GraphModule, RecoveryRecord]:
    """Call the user's ``fine_tune(model, teacher)``; the model (or the one it returns) must keep its shapes.

    With ``measure``, the weights before the call are kept instead when the callback did
    not improve the held-out measure (finite weights only: non-finite ones are left for
    the caller to report).
    """
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    start = _BestState(model, measure, patience=1)
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
    finite = all(torch.isfinite(v).all() for v in out.state_dict().values() if v.is_floating_point())
    if measure is None or not finite:
        stop = "kept the callback's model" if finite else "the callback left non-finite weights"
        return out, RecoveryRecord("fine_tune", start.first, None, None, None, stop)
    start.model = out
    start.update(1)
    if start.best_step == 0:
        start.model = model
        start.restore()
        model.eval()
        return model, RecoveryRecord(
            "fine_tune", start.first, start.first, None, 0, "reverted: not better held out"
        )
    return out, RecoveryRecord("fine_tune", start.first, start.best, None, 1, "kept the callback's model")


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
    measure: Callable[[nn.Module], float] | None = None,
    eval_every: int | None = None,
    patience: int = 5,
    progress: Callable[[Iterable[Any]], Iterable[Any]] = lambda it: it,
    data_parallel: bool = True,
    micro_batch: int | None = None,
) -> RecoveryRecord:
    """Train ``student`` in place to match ``teacher`` (method notes §5); return what it bought.

    ``micro_batch`` (one process only) splits each batch into parts of that many samples and
    accumulates their gradients: the same step (the losses are means over the batch), with the
    activations of one part alive at a time.

    With ``measure`` the student is measured every ``eval_every`` steps (default: a fifth of
    ``steps``, else 10) and after the last one; the best weights, the starting ones included,
    are kept, and training stops after ``patience`` measurements without improvement. Under
    ``torch.distributed`` the student trains data-parallel unless ``data_parallel`` is false
    (every rank then trains alone on the same batches).
    """
    names = feature_nodes(student, teacher)
    nodes_s = {n.name: n for n in student.graph.nodes}
    nodes_t = {n.name: n for n in teacher.graph.nodes}
    adapters = nn.ModuleList(adapter(node_shape(nodes_s[n]), node_shape(nodes_t[n])) for n in names)
    if (first := next(student.parameters(), None)) is not None:  # a float16 student: float16 adapters
        adapters.to(device=first.device, dtype=first.dtype)
    tapped_s, tapped_t = tap(student, names), tap(teacher, names)
    n_inputs = sum(1 for n in student.graph.nodes if n.op == "placeholder")
    train_module: nn.Module = StudentWithAdapters(tapped_s, adapters)
    runner: nn.Module = train_module
    if data_parallel and dist.is_available() and dist.is_initialized():
        runner = DistributedDataParallel(train_module)  # adapters' gradients are averaged too
    opt = torch.optim.AdamW(train_module.parameters(), lr=lr, weight_decay=weight_decay)
    every = eval_every or (max(1, steps // 5) if steps else 10)
    best = _BestState(student, measure, patience)
    train_with_frozen_batchnorm(tapped_s)
    teacher.eval()
    batches = _loader(train_loader)
    iterator = itertools.islice(batches, steps) if steps is not None else batches
    done, stop, measured = 0, "steps done" if steps is not None else "loader exhausted", True
    split = micro_batch if runner is train_module else None
    for batch in progress(iterator):
        opt.zero_grad(set_to_none=True)
        for args, share in _parts(batch_args(batch), split):
            with torch.enable_grad():  # training, even when the caller runs optimize under torch.no_grad()
                loss = _distill_loss(runner, tapped_t, args, n_inputs, feature_weight if names else 0.0)
                (loss * share).backward()
        opt.step()
        done += 1
        measured = done % every == 0
        if measured and best.update(done):
            stop = f"no held-out improvement in {patience} measurements"
            break
    if not measured:
        best.update(done)
    best.restore()
    student.eval()
    return RecoveryRecord("distill", best.first, best.best, done, best.best_step if measure else done, stop)


def _parts(args: tuple[Any, ...], size: int | None) -> list[tuple[tuple[Any, ...], float]]:
    """``args`` cut along the batch dim into parts of ``size`` samples, each with its share of the batch."""
    first = next((a for a in args if isinstance(a, torch.Tensor) and a.dim() > 0), None)
    if size is None or first is None or first.shape[0] <= size:
        return [(args, 1.0)]
    n = first.shape[0]
    cut = [
        a.split(size) if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == n else None
        for a in args
    ]
    count = len(range(0, n, size))
    return [
        (tuple(a if c is None else c[k] for a, c in zip(args, cut, strict=True)), min(size, n - k * size) / n)
        for k in range(count)
    ]


PROBE_STEPS, PROBE_LR, PROBE_MICRO_BATCH = 30, 1e-3, 2


def recoverability(
    student: fx.GraphModule,
    teacher: fx.GraphModule,
    train: Sequence[Any],
    measure: Callable[[nn.Module], float],
    *,
    steps: int = PROBE_STEPS,
    lr: float = PROBE_LR,
    seed: int = 0,
) -> float:
    """How far a short distillation takes a copy of ``student``: the best ``measure`` seen, the start included.

    ``allocator="auto"`` ranks its candidate runs by it: where one-shot outputs are destroyed
    (every candidate's deviation ≈ 1) they no longer separate candidates, and what decides
    the result after recovery is how fast each one learns back (docs/architecture.md). The
    student is not touched; ``train`` batches are cycled for ``steps`` steps; the adapters'
    initialisation is seeded (``seed``), so the ranking is the same run to run. Under
    ``torch.distributed`` every rank passes the same ``train`` batches and trains alone (no DDP);
    ``measure`` pools over ranks, so all ranks get the value one process would.
    """
    probe = copy.deepcopy(student)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        batches = itertools.islice(itertools.cycle(train), steps)
        try:
            record = distill(
                probe, teacher, batches, steps=steps, lr=lr, measure=measure, data_parallel=False,
                micro_batch=PROBE_MICRO_BATCH,  # a probe's training memory stays near a forward's
            )  # fmt: skip
        except DivergedError:  # e.g. float16 training at the probe's lr: the candidate keeps its start
            return measure(student)
    return math.inf if record.after is None else record.after


def _task_loss(out_s: Any, out_t: Any) -> torch.Tensor:
    """KL to the teacher's soft outputs for logits (2-D outputs), else MSE summed over output tensors."""
    if isinstance(out_s, torch.Tensor) and out_s.dim() == 2:
        return F.kl_div(F.log_softmax(out_s, -1), F.softmax(out_t, -1), reduction="batchmean")
    leaves_s = [t for t in torch.utils._pytree.tree_leaves(out_s) if isinstance(t, torch.Tensor)]
    leaves_t = [t for t in torch.utils._pytree.tree_leaves(out_t) if isinstance(t, torch.Tensor)]
    return sum(F.mse_loss(a, b) for a, b in zip(leaves_s, leaves_t, strict=True))


def held_out_loss(teacher: nn.Module, batches: Sequence[Any]) -> Callable[[nn.Module], float]:
    """The distillation task loss to ``teacher`` on held-out ``batches`` (pooled over ranks), lower is better.

    What distillation's early stopping watches: the loss it optimises, on data it never
    trains on. (The budget's relative output MSE is the wrong watch for a KL objective: KL
    ignores a per-sample shift of the logits that MSE counts, so training that makes the
    soft outputs closer can look worse, and the guard reverted every demo distillation.)
    """
    n_inputs = (
        sum(1 for n in teacher.graph.nodes if n.op == "placeholder") if hasattr(teacher, "graph") else None
    )

    def inputs(b: Any) -> tuple[Any, ...]:
        args = batch_args(b)
        return args[:n_inputs] if n_inputs is not None else args

    with torch.no_grad():
        refs = [teacher(*inputs(b)) for b in batches]

    def measure(model: nn.Module) -> float:
        total = count = 0.0
        with torch.no_grad():
            for b, ref in zip(batches, refs, strict=True):
                total += float(_task_loss(model(*inputs(b)), ref))
                count += 1
        total, count = reducer().all_sum([total, count])
        return total / count if count else 0.0

    return measure


def _distill_loss(
    runner: nn.Module, tapped_t: fx.GraphModule, args: tuple[Any, ...], n_inputs: int, feature_weight: float
) -> torch.Tensor:
    """KL to the teacher's soft outputs (+ cross-entropy with labels) for logits, else MSE; + L1 on features."""
    labels = args[n_inputs] if len(args) > n_inputs else None
    inputs = args[:n_inputs]
    with torch.no_grad():
        out_t, feats_t = tapped_t(*inputs)
    out_s, feats_s = runner(*inputs)
    task = _task_loss(out_s, out_t)
    if labels is not None and isinstance(out_s, torch.Tensor) and out_s.dim() == 2:
        task = task + F.cross_entropy(out_s, labels)
    loss = task
    if feature_weight:
        loss = task + feature_weight * sum(F.l1_loss(a, b) for a, b in zip(feats_s, feats_t, strict=True))
    if not torch.isfinite(loss):
        raise DivergedError(
            f"distillation diverged (loss {loss.item()}); lower lr or check the training data"
        )
    return loss


__all__ = [
    "RecoveryRecord",
    "distill",
    "feature_nodes",
    "held_out_loss",
    "run_fine_tune",
    "train_with_frozen_batchnorm",
]
