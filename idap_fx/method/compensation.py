"""Retraining-free compensation of a pruning step: what a consumer's removed inputs carried moves into what stays.

For every conv (groups = 1) or linear layer that loses input channels:

* ``mean`` (FLAP's bias compensation): the removed channels' mean contribution ``W_r E[x_r]`` is
  added to the bias, so the layer's expected output is unchanged. Uses the scoring statistics
  already streamed.
* ``least_squares``: the removed channels are regressed on the kept ones over the calibration
  data (ridge, ``x_r ≈ A x_k + c`` per position), then ``W_r A`` is folded into the kept
  weights and ``W_r c`` into the bias: the consumer's output is the least-squares best that its
  kept inputs can reach (``mean`` is the case ``A = 0``). One extra pass over the calibration
  batches collects each consumer's input second moments (summed in float64, all-reduced under
  ``torch.distributed``); consumers are taken in chunks so the moments never exceed
  ``_GRAM_BUDGET`` numbers at once.
* ``reconstruct``: ``least_squares``, then every conv (groups = 1) / linear layer of the pruned
  model, in graph order, is re-fitted (ridge, weight and bias) so that from the inputs the pruned
  model now gives it, it reproduces the output the model had before the step on the rows it
  keeps. Each fit sees the layers before it already re-fitted, so errors do not pile up with
  depth. Both graphs are stepped node by node over all calibration batches at once (one forward each).
* ``auto`` (the default): ``reconstruct`` with at least ``RECONSTRUCT_MIN_SAMPLES`` calibration samples,
  ``least_squares`` with fewer (where the re-fit learns the few calibration images).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from idap_fx.errors import IdapError
from idap_fx.graph.dependency import DependencyGraph, Plan
from idap_fx.method.channel_stats import Site, batch_args
from idap_fx.method.collective import reducer

MODES = ("mean", "least_squares", "reconstruct", "auto")
_GRAM_BUDGET = 1 << 23  # float64 numbers of input moments held at once (64 MiB)
RIDGE = 1e-2  # ridge, relative to the kept inputs' mean variance
RECONSTRUCT_MIN_SAMPLES = 256
"""``auto`` re-fits (``reconstruct``) from this many calibration samples on (all processes), else stops at
``least_squares``: with fewer, the re-fit learns the calibration images (docs/architecture.md, "Compensation")."""
REFIT_RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
"""``reconstruct``'s candidate ridge strengths, relative to the mean XᵀX diagonal."""
REFIT_MAX_INPUTS = 2049
"""Wider layers (inputs × kernel + 1) keep their compensated weights: the moments stay small."""
REFIT_MEMORY = 256 << 20
"""Bytes of activations ``reconstruct`` may hold for its batches at once (both models): above it, it goes
on with fewer batches (two at least), then stops re-fitting (the rest stay compensated)."""


@dataclass
class Consumer:
    """One layer whose input channels a plan removes: ``gone`` over its inputs, ``rows`` it keeps."""

    target: str
    gone: torch.Tensor
    rows: torch.Tensor | None
    mean: torch.Tensor
    channel_dim: int


def consumers(
    before: fx.GraphModule, dg: DependencyGraph, plan: Plan, sites: Sequence[Site] | None = None
) -> list[Consumer]:
    """The conv (groups = 1) / linear layers of ``before`` that lose input channels under ``plan``.

    With ``sites`` (``mean``): only layers whose input has streamed statistics, with their means.
    Without (``least_squares`` measures its own): every such layer, so the choice depends on the
    graph alone and replaying a step (``idap_fx.curve``) finds the same layers.
    """
    removed = dg.removed_elements(plan)
    nodes = {n.name: n for n in before.graph.nodes}
    site_of = {(s.node, s.slot.numel()): s for s in sites or () if not s.probe}
    found = []
    for m in dg.members:
        node = nodes.get(m.node)
        if m.role != "in" or m.dim != 1 or node is None or node.op != "call_module":
            continue
        mod = before.get_submodule(node.target)
        conv = isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        if not (conv or isinstance(mod, nn.Linear)) or getattr(mod, "groups", 1) != 1:
            continue
        arg = node.args[0]
        layout = dg.layouts.get(arg.name) if isinstance(arg, fx.Node) else None
        site = site_of.get((arg.name, mod.weight.shape[1])) if layout is not None else None
        channel_dim = 1 if conv else getattr(layout, "ndim", 0) - 1
        axis = None if layout is None else layout.axis_of(channel_dim)
        if (sites is not None and site is None) or axis is None or axis.ids.size != mod.weight.shape[1]:
            continue
        gone = torch.from_numpy(removed[axis.ids.ravel()])
        if not gone.any():
            continue
        out = next((o for o in dg.members if o.node == m.node and o.role == "out" and o.dim == 0), None)
        rows = None if out is None else torch.from_numpy(~removed[out.ids])
        mean = site.channel_mean() if site is not None else torch.zeros(0, dtype=torch.float64)
        found.append(Consumer(str(node.target), gone, rows, mean, channel_dim))
    return found


def resolve(mode: str, batches: Sequence[Any]) -> str:
    """The mode that runs: ``auto`` is ``reconstruct`` with at least ``RECONSTRUCT_MIN_SAMPLES`` calibration
    samples (the first dim of each batch's first tensor, summed over processes), else ``least_squares``."""
    if mode != "auto":
        return mode
    local = 0
    for batch in batches:
        first = next((t for t in pytree.tree_leaves(batch) if isinstance(t, torch.Tensor) and t.dim()), None)
        local += 0 if first is None else int(first.shape[0])
    (total,) = reducer().all_sum([local])
    return "reconstruct" if total >= RECONSTRUCT_MIN_SAMPLES else "least_squares"


def compensate(
    before: fx.GraphModule,
    after: fx.GraphModule,
    dg: DependencyGraph,
    plan: Plan,
    sites: Sequence[Site],
    mode: str = "mean",
    batches: Sequence[Any] = (),
) -> int:
    """Fold removed inputs into the consumers of ``after`` (``mode`` as above, ``auto`` via ``resolve``);
    return layers changed.

    ``least_squares`` / ``reconstruct`` read ``batches`` (the calibration batches), ``mean`` the ``sites``.
    """
    mode = resolve(mode, batches)
    if mode in ("least_squares", "reconstruct"):
        if not batches:
            raise IdapError(f"{mode} compensation needs calibration batches")
        found = consumers(before, dg, plan)
        for chunk in _chunks(before, found):
            for c, moments in zip(chunk, _moments(before, chunk, batches), strict=True):
                _fold(before, after, c, *_regression(c, *moments))
        refitted = reconstruct(before, after, dg, plan, batches) if mode == "reconstruct" else []
        return len({c.target for c in found} | set(refitted))
    found = consumers(before, dg, plan, sites)
    for c in found:
        _fold(before, after, c, None, c.mean[c.gone])
    return len(found)


def _chunks(before: fx.GraphModule, found: list[Consumer]) -> list[list[Consumer]]:
    chunks: list[list[Consumer]] = [[]]
    held = 0
    for c in found:
        size = before.get_submodule(c.target).weight.shape[1] ** 2
        if chunks[-1] and held + size > _GRAM_BUDGET:
            chunks.append([])
            held = 0
        chunks[-1].append(c)
        held += size
    return [c for c in chunks if c]


def _moments(
    before: fx.GraphModule, chunk: list[Consumer], batches: Sequence[Any]
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(sum, Gram, count) of each consumer's input per position, over ``batches`` and all ranks."""
    acc = []
    hooks = []
    for c in chunk:
        width = before.get_submodule(c.target).weight.shape[1]
        acc.append([torch.zeros(width, dtype=torch.float64), torch.zeros(width, width, dtype=torch.float64),
                    torch.zeros(1, dtype=torch.float64)])  # fmt: skip

        def hook(
            _mod: nn.Module,
            args: tuple[Any, ...],
            slot: list[torch.Tensor] = acc[-1],
            dim: int = c.channel_dim,
        ) -> None:
            x = args[0].detach().movedim(dim, -1).reshape(-1, slot[0].numel()).float()
            slot[0] += x.sum(0, dtype=torch.float64)
            slot[1] += (x.T @ x).double()  # one batch in float32, the running sum in float64
            slot[2] += x.shape[0]

        hooks.append(before.get_submodule(c.target).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for batch in batches:
                before(*batch_args(batch))
    finally:
        for h in hooks:
            h.remove()
    for slot in acc:
        reducer().all_sum_(slot)
    return [(s, g, n) for s, g, n in acc]


def _regression(
    c: Consumer, total: torch.Tensor, gram: torch.Tensor, count: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge ``x_r ≈ A x_k + c``: (A of shape removed × kept, c of length removed)."""
    n = max(float(count), 1.0)
    mu = total / n
    cov = gram / n - torch.outer(mu, mu)
    k, r = ~c.gone, c.gone
    ckk = cov[k][:, k]
    lam = RIDGE * float(ckk.diagonal().mean()) if k.any() else 0.0
    ckk = ckk + max(lam, 1e-12) * torch.eye(ckk.shape[0], dtype=ckk.dtype)
    a = torch.linalg.solve(ckk, cov[k][:, r]).T
    return a, mu[r] - a @ mu[k]


def _fold(
    before: fx.GraphModule, after: fx.GraphModule, c: Consumer, a: torch.Tensor | None, offset: torch.Tensor
) -> None:
    """Kept weights += W_r A (``a`` None: unchanged), bias += W_r · offset (summed over the kernel), rows
    kept by ``after``."""
    w = before.get_submodule(c.target).weight.detach().double()
    w_r = w[:, c.gone]
    delta = (w_r.sum(dim=tuple(range(2, w.dim()))) if w.dim() > 2 else w_r) @ offset
    delta = delta if c.rows is None else delta[c.rows]
    target = after.get_submodule(c.target)
    with torch.no_grad():
        if a is not None:
            w_k = w[:, ~c.gone] + torch.einsum("or...,rk->ok...", w_r, a)
            target.weight.copy_((w_k if c.rows is None else w_k[c.rows]).to(target.weight.dtype))
        delta = delta.to(target.weight.dtype)
        if target.bias is None:
            target.bias = nn.Parameter(delta.clone())
        else:
            target.bias.add_(delta)


class _Stepper:
    """Runs a GraphModule one node at a time on every calibration batch at once, so ``reconstruct`` can
    stop before a layer, re-fit it and go on: one forward per batch in all, with the live values of
    every batch held together (a forward over all the calibration data as one batch)."""

    def __init__(self, gm: fx.GraphModule, batches: Sequence[Any]) -> None:
        self.nodes = list(gm.graph.nodes)
        self.pos = 0
        self.own = {id(t) for t in gm.parameters()} | {id(t) for t in gm.buffers()}
        self.runs = []
        for batch in batches:
            run = fx.Interpreter(gm, garbage_collect_values=True)
            run.args_iter = iter(batch_args(batch))
            run.env = {}
            self.runs.append(run)

    def until(self, name: str) -> fx.Node | None:
        """Run every node before the one called ``name`` and return it (None: the graph has no such node)."""
        while self.pos < len(self.nodes):
            node = self.nodes[self.pos]
            if node.name == name:
                return node
            self.step()
        return None

    def step(self) -> fx.Node:
        """Run the next node on every batch (values no later node reads are dropped)."""
        node = self.nodes[self.pos]
        with torch.no_grad():
            for run in self.runs:
                run.env[node] = run.run_node(node)
                for dead in run.user_to_last_uses.get(node, []):
                    del run.env[dead]
        self.pos += 1
        return node

    def values(self, node: fx.Node) -> list[Any]:
        """``node``'s value on every batch."""
        return [run.env[node] for run in self.runs]

    def held(self) -> int:
        """Bytes of the activations held for all batches (the graph's own parameters not counted)."""
        leaves = [v for run in self.runs for v in pytree.tree_leaves(list(run.env.values()))]
        return sum(t.nbytes for t in leaves if isinstance(t, torch.Tensor) and id(t) not in self.own)

    def drop_last(self) -> None:
        """Go on with one batch less (the activations held for it are freed)."""
        self.runs.pop()


def _accumulate(
    fold: list[torch.Tensor], mod: nn.Module, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor | None
) -> None:
    """Add one batch to ``fold`` = [XᵀX, XᵀY, ||Y||²]: X's rows are output positions, its columns what the
    layer multiplies (conv patches via ``unfold``) and a 1; Y the layer's output on the kept rows. Products
    in float32 per batch (no patch matrix is copied), sums in float64."""
    if isinstance(mod, nn.Linear):
        xs, ys = [x.reshape(-1, x.shape[-1]).T], [y.reshape(-1, y.shape[-1]).T]  # (inputs, positions)
    else:
        patches = nn.functional.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)
        xs, ys = list(patches), list(y.flatten(2))  # per image: (inputs × kernel, positions)
    gram, cross, energy = fold
    d = gram.shape[0] - 1
    for xi, yi in zip(xs, ys, strict=True):
        xi, yi = xi.float(), (yi if rows is None else yi[rows]).float()
        gram[:d, :d] += (xi @ xi.T).double()
        total = xi.sum(1).double()
        gram[:d, d] += total
        gram[d, :d] += total
        gram[d, d] += xi.shape[1]
        cross[:d] += (xi @ yi.T).double()
        cross[d] += yi.sum(1).double()
        energy += (yi.double() ** 2).sum()


def _refittable(after: fx.GraphModule) -> list[tuple[str, str]]:
    """(node name, module path) of the conv2d (groups = 1, numeric zero padding) / linear layers called once,
    with a float32 / float64 weight of their own (a half-precision layer keeps its least-squares weights: a fit
    rounded to float16 gains little and moves its outputs off ONNX Runtime's by more than rounding)."""
    calls: dict[str, list[str]] = {}
    for n in after.graph.nodes:
        if n.op == "call_module":
            calls.setdefault(str(n.target), []).append(n.name)
    uses: dict[int, int] = {}
    for _, p in after.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    found = []
    for target, names in calls.items():
        mod = after.get_submodule(target)
        weight = getattr(mod, "weight", None)
        if uses.get(id(weight), 0) > 1:  # tied (an LM head sharing the embedding): not this layer's alone
            continue
        conv = (
            isinstance(mod, nn.Conv2d)
            and mod.groups == 1
            and mod.padding_mode == "zeros"
            and not isinstance(mod.padding, str)
        )
        full = getattr(weight, "dtype", None) in (torch.float32, torch.float64)
        if len(names) == 1 and (conv or isinstance(mod, nn.Linear)) and full:
            found.append((names[0], target))
    return found


def _ridge(gram: torch.Tensor, cross: torch.Tensor, current: torch.Tensor, lam: float) -> torch.Tensor:
    """argmin ||X W - Y||² + lam ||W - current||² from ``gram`` = XᵀX and ``cross`` = XᵀY."""
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram + lam * eye, cross + lam * current)


def _error(w: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor) -> float:
    """||X W - Y||² up to the constant ||Y||², from the moments of the data it is measured on."""
    return float((w * (gram @ w)).sum() - 2 * (w * cross).sum())


def _fit(folds: list[tuple[torch.Tensor, torch.Tensor, float]], current: torch.Tensor) -> torch.Tensor | None:
    """The refit chosen on held-out data: each ridge strength fits one fold (XᵀX, XᵀY, ||Y||²) and is
    scored on the other; the current weights compete too. None when no strength beats them by more than
    rounding (1e-9 of the target's energy): the data cannot improve the layer."""
    (g_a, c_a, e_a), (g_b, c_b, e_b) = folds
    scale = float((g_a + g_b).diagonal().mean()) + 1e-12
    best_lam, best = None, _error(current, g_a, c_a) + _error(current, g_b, c_b) - 1e-9 * (e_a + e_b)
    for rel in REFIT_RIDGES:
        lam = rel * scale / 2
        held_out = _error(_ridge(g_a, c_a, current, lam), g_b, c_b) + _error(
            _ridge(g_b, c_b, current, lam), g_a, c_a
        )
        if held_out < best:
            best_lam, best = rel * scale, held_out
    return None if best_lam is None else _ridge(g_a + g_b, c_a + c_b, current, best_lam)


def reconstruct(
    before: fx.GraphModule, after: fx.GraphModule, dg: DependencyGraph, plan: Plan, batches: Sequence[Any]
) -> list[str]:
    """Re-fit ``after``'s conv / linear layers in graph order to ``before``'s outputs (see the module doc);
    return the layers changed.

    Calibration batches alternate between two folds by global index (the same on every rank); a
    layer's ridge strength is chosen by fitting one fold and measuring the other, and it is left
    as it is where no strength beats it on held-out data (a classifier over a few pooled images)."""
    removed = dg.removed_elements(plan)
    out_rows = {m.node: m.ids for m in dg.members if m.role == "out" and m.dim == 0}
    first, _ = reducer().offset(len(batches))
    done = []
    ahead, behind = _Stepper(after, batches), _Stepper(before, batches)
    for node, target in _refittable(after):
        mod = after.get_submodule(target)
        ids = out_rows.get(node)
        rows = None if ids is None else torch.from_numpy(~removed[ids])
        width = mod.weight[0].numel() + 1
        if (rows is not None and int(rows.sum()) != mod.weight.shape[0]) or width > REFIT_MAX_INPUTS:
            continue  # rows not recorded for this layer, or moments too large: it stays as compensated
        here, there = ahead.until(node), behind.until(node)
        if here is None or there is None or there.target != here.target:
            break  # the graphs no longer correspond: the layers left stay as compensated
        while (held := ahead.held() + behind.held()) > REFIT_MEMORY and len(ahead.runs) > 2:
            ahead.drop_last()
            behind.drop_last()
        if held > REFIT_MEMORY:
            break  # even two batches hold too much here: the layers left stay as compensated
        inputs = ahead.values(here.args[0])
        behind.step()
        targets = behind.values(there)
        out = mod.weight.shape[0]
        folds = [
            [
                torch.zeros(width, width, dtype=torch.float64),
                torch.zeros(width, out, dtype=torch.float64),
                torch.zeros(1, dtype=torch.float64),
            ]
            for _ in range(2)
        ]
        for k, (x_in, y_out) in enumerate(zip(inputs, targets, strict=True)):
            _accumulate(folds[(first + k) % 2], mod, x_in.detach(), y_out.detach(), rows)
        reducer().all_sum_([t for f in folds for t in f])
        w0 = mod.weight.detach().reshape(out, -1).double()
        b0 = torch.zeros(out, dtype=w0.dtype) if mod.bias is None else mod.bias.detach().double()
        sol = _fit([(g, c, float(e)) for g, c, e in folds], torch.cat([w0.T, b0[None]], 0))
        if sol is None:
            continue
        with torch.no_grad():
            mod.weight.copy_(sol[:-1].T.reshape(mod.weight.shape).to(mod.weight.dtype))
            bias = sol[-1].to(mod.weight.dtype)
            if mod.bias is None:
                mod.bias = nn.Parameter(bias.clone())
            else:
                mod.bias.copy_(bias)
        done.append(target)
    return done
