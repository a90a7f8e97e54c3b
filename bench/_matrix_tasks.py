"""The four models of ``quality_matrix.py``, each with its data splits, recovery loss and quality metric.

A ``Task`` bundles what every pruning method and the shared recovery loop need:
the unpruned model (the teacher), calibration batches (model inputs only, no labels),
a seeded stream of training batches for recovery, held-out validation batches (for
keeping the best recovery state) and test batches (for the reported metric, never used
otherwise). A batch is ``(inputs, labels)`` with ``inputs`` a tuple of model inputs
and ``labels`` ``None`` where the data has none. All data ships in PyPI packages.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _data import augmented_views, digits_splits, imagenet_mobilenet_v2, photos, seed_all, train_classifier
from torch import nn

Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor | None]
CACHE = Path(__file__).resolve().parent / "_cache"


@dataclass
class Task:
    """One model of the matrix with its data, metric and recovery loss.

    ``ignored`` lists the modules Torch-Pruning must not prune (its ``ignored_layers``);
    ``heads`` names the output layers left out of the width statistics.
    """

    name: str
    model: nn.Module
    calib: list[tuple[torch.Tensor, ...]]
    stream: Callable[[int], Iterator[Batch]]
    val: list[Batch]
    test: list[Batch]
    metric: Callable[[nn.Module, nn.Module, list[Batch]], float]
    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    taylor_loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    ignored: Callable[[nn.Module], list[nn.Module]]
    heads: tuple[str, ...]
    metric_name: str
    lr: float
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def example(self) -> tuple[torch.Tensor, ...]:
        """One-sample example inputs (what ``optimize`` and Torch-Pruning trace with)."""
        return tuple(t[:1] for t in self.calib[0])


_TEACHER_OUT: dict[tuple[int, int], torch.Tensor] = {}


def _outputs(model: nn.Module, batches: list[Batch]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(*inp) for inp, _ in batches])


def _teacher_outputs(teacher: nn.Module, batches: list[Batch]) -> torch.Tensor:
    """The unpruned model's outputs on ``batches``, computed once (it never changes)."""
    key = (id(teacher), id(batches))
    if key not in _TEACHER_OUT:
        _TEACHER_OUT[key] = _outputs(teacher, batches)
    return _TEACHER_OUT[key]


def label_accuracy(teacher: nn.Module, model: nn.Module, batches: list[Batch]) -> float:
    """Top-1 accuracy against the labels, %."""
    y = torch.cat([lab for _, lab in batches])
    return 100.0 * (_outputs(model, batches).argmax(1) == y).float().mean().item()


def top1_agreement(teacher: nn.Module, model: nn.Module, batches: list[Batch]) -> float:
    """% of inputs whose top-1 class equals the unpruned model's."""
    return (
        100.0
        * (_outputs(model, batches).argmax(1) == _teacher_outputs(teacher, batches).argmax(1))
        .float()
        .mean()
        .item()
    )


def cosine_x100(teacher: nn.Module, model: nn.Module, batches: list[Batch]) -> float:
    """Mean cosine similarity to the unpruned model's outputs, × 100 (so differences read as pp)."""
    return (
        100.0
        * F.cosine_similarity(_outputs(model, batches), _teacher_outputs(teacher, batches), dim=1)
        .mean()
        .item()
    )


def kl_ce_loss(out: torch.Tensor, teacher_out: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """KL to the teacher's softmax, plus cross-entropy where labels exist (as ``_data.fine_tune``)."""
    loss = F.kl_div(F.log_softmax(out, -1), F.softmax(teacher_out, -1), reduction="batchmean")
    return loss if labels is None else loss + F.cross_entropy(out, labels)


def cosine_loss(out: torch.Tensor, teacher_out: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """1 − cosine to the teacher's embedding."""
    return (1 - F.cosine_similarity(out, teacher_out, dim=1)).mean()


def label_or_pseudo_ce(
    out: torch.Tensor, teacher_out: torch.Tensor, labels: torch.Tensor | None
) -> torch.Tensor:
    """Cross-entropy to the labels, else to the teacher's top-1 (KL to the teacher has zero gradient there)."""
    return F.cross_entropy(out, teacher_out.argmax(1) if labels is None else labels)


def contrastive_loss(
    out: torch.Tensor, teacher_out: torch.Tensor, labels: torch.Tensor | None
) -> torch.Tensor:
    """In-batch InfoNCE: each embedding must be closest to its own teacher embedding (temperature 0.05)."""
    sim = F.normalize(out, dim=1) @ F.normalize(teacher_out, dim=1).T / 0.05
    return F.cross_entropy(sim, torch.arange(len(out)))


def _stream(xs: tuple[torch.Tensor, ...], y: torch.Tensor | None, batch: int, seed: int) -> Iterator[Batch]:
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(xs[0]), generator=gen)
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i : i + batch]
            yield tuple(x[idx] for x in xs), (None if y is None else y[idx])


def _split(xs: tuple[torch.Tensor, ...], y: torch.Tensor | None, batch: int) -> list[Batch]:
    n = len(xs[0])
    return [
        (tuple(x[i : i + batch] for x in xs), None if y is None else y[i : i + batch])
        for i in range(0, n, batch)
    ]


# --------------------------------------------------------------------------- the second small CNN


class InvertedResidual(nn.Module):
    """MobileNetV2-style block: 1×1 expand, 3×3 depthwise, optional squeeze-excitation, 1×1 project."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, se: bool) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6())
        self.dw = nn.Sequential(
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU6()
        )
        self.se = (
            nn.Sequential(
                nn.AdaptiveAvgPool2d(1), nn.Conv2d(mid, mid // 4, 1), nn.ReLU(), nn.Conv2d(mid // 4, mid, 1)
            )
            if se
            else None
        )
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dw(self.expand(x))
        if self.se is not None:
            h = h * torch.sigmoid(self.se(h))
        h = self.project(h)
        return x + h if self.residual else h


class MobileDigitsNet(nn.Module):
    """Depthwise-separable CNN with inverted residuals (two with SE) for 8×8 digits; unlike DigitsNet."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.blocks = nn.Sequential(
            InvertedResidual(16, 24, 1, 4, se=False),
            InvertedResidual(24, 24, 1, 4, se=True),
            InvertedResidual(24, 40, 2, 4, se=False),
            InvertedResidual(40, 40, 1, 4, se=True),
        )
        self.last = nn.Sequential(nn.Conv2d(40, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU6())
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.last(self.blocks(self.stem(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class BasicBlock(nn.Module):
    """ResNet's two 3×3 convolutions with batch norm and a residual (a 1×1 projection where the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = (
            None
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
        return F.relu(h + (x if self.down is None else self.down(x)))


class ResDigitsNet(nn.Module):
    """A plain ResNet (six basic blocks over three stages, 32 / 64 / 128 wide) for 8×8 digits: a third
    topology, added after the defaults were chosen on the other models (an unseen-model check)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        widths = [(32, 32, 1), (32, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 1)]
        self.layers = nn.Sequential(*(BasicBlock(*w) for w in widths))
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


# --------------------------------------------------------------------------- tasks


def _train_digits(build: Callable[[], nn.Module], arch: str, seed: int, data: dict[str, Any]) -> nn.Module:
    """Train with quality.py's recipe (AdamW, one-cycle, 1-pixel shifts), keep the best-validation epoch; cached."""
    from quality import TRAIN, _shift

    CACHE.mkdir(exist_ok=True)
    path = CACHE / f"{arch}-seed{seed}-torch{torch.__version__}.pt"
    seed_all(seed)
    model = build()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    val = _split((data["val"][0],), data["val"][1], 512)
    train_classifier(
        model, *data["train"], lambda m: label_accuracy(m, m, val), seed=seed, lr=TRAIN["lr"],
        weight_decay=TRAIN["weight_decay"], batch=TRAIN["batch"], epochs=TRAIN["epochs"], augment=_shift,
    )  # fmt: skip
    torch.save(model.state_dict(), path)
    return model.eval()


def digits_task(arch: str, seed: int, calib_batches: int) -> Task:
    """DigitsNet (quality.py), MobileDigitsNet or ResDigitsNet on scikit-learn's digits; metric: test accuracy."""
    import quality

    data = digits_splits(quality.TRAIN["split_seed"])
    builds = {
        "DigitsNet": lambda: quality.DigitsNet(quality.TRAIN["width"]),
        "MobileDigitsNet": MobileDigitsNet,
    }
    build = builds.get(arch, ResDigitsNet)
    model = _train_digits(build, arch, seed, data)
    x_tr, y_tr = data["train"]
    gen = torch.Generator().manual_seed(1000 + seed)
    calib = [(b,) for b in x_tr[torch.randperm(len(x_tr), generator=gen)[: calib_batches * 64]].split(64)]
    return Task(
        name=arch,
        model=model,
        calib=calib,
        stream=lambda s: _stream((x_tr,), y_tr, 64, 2000 + s),
        val=_split((data["val"][0],), data["val"][1], 512),
        test=_split((data["test"][0],), data["test"][1], 512),
        metric=label_accuracy,
        loss=kl_ce_loss,
        taylor_loss=label_or_pseudo_ce,
        ignored=lambda m: [m.head],
        heads=("head",),
        metric_name="test accuracy (%)",
        lr=1e-3,
        info={"test_images": len(data["test"][1])},
    )


# Photos never used for calibration or recovery (evaluation) and for recovery's early stopping (validation).
TEST_PHOTOS = ("grace_hopper", "china", "coffee", "coins", "moon", "rocket")
VAL_PHOTOS = ("astronaut", "clock", "brick")


def mobilenet_task(size: int, calib_views: int, test_views: int) -> Task:
    """ImageNet MobileNetV2; photos split into calibration/training, validation and test photos."""
    model = imagenet_mobilenet_v2()
    images = photos()
    train = [v for k, v in images.items() if k not in TEST_PHOTOS + VAL_PHOTOS]
    calib = [(b,) for b in augmented_views(train, calib_views, size, seed=0)]
    pool = torch.cat(augmented_views(train, 160, size, seed=1))
    val = torch.cat(augmented_views([images[k] for k in VAL_PHOTOS], 48, size, seed=2))
    test = torch.cat(augmented_views([images[k] for k in TEST_PHOTOS], test_views, size, seed=3))
    return Task(
        name="MobileNetV2",
        model=model,
        calib=calib,
        stream=lambda s: _stream((pool,), None, 8, 4 + s),
        val=_split((val,), None, 16),
        test=_split((test,), None, 16),
        metric=top1_agreement,
        loss=kl_ce_loss,
        taylor_loss=label_or_pseudo_ce,
        ignored=lambda m: [m.classifier[1]],
        heads=("classifier.1",),
        metric_name="top-1 agreement with the unpruned model (%), unseen photos",
        lr=1e-5,
        info={
            "size": size,
            "train_photos": len(train),
            "val_photos": list(VAL_PHOTOS),
            "test_photos": list(TEST_PHOTOS),
            "test_views": test_views,
        },  # fmt: skip
    )


def minilm_task(calib_batches: int, test_sentences: int) -> Task:
    """all-MiniLM-L6-v2 sentence embeddings (transformer_quality.py); metric: held-out cosine × 100."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformer_quality as tq
    import transformers

    path = tq.model_dir()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    hf = transformers.AutoModel.from_pretrained(path).eval()

    def encode(sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = tok(sentences, padding="max_length", max_length=tq.SEQ, truncation=True, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    train, held = tq.stdlib_sentences()
    g = torch.Generator().manual_seed(0)
    train = [train[i] for i in torch.randperm(len(train), generator=g).tolist()]
    held = [held[i] for i in torch.randperm(len(held), generator=g).tolist()]
    n_cal = calib_batches * 32
    calib = [encode(train[i : i + 32]) for i in range(0, n_cal, 32)]
    pool = encode(train[n_cal : n_cal + 1024])
    val = encode(held[:96])
    test = encode(held[96 : 96 + test_sentences])
    gm = tq.sentence_encoder(hf, calib[0])
    keep = {n for n, m in gm.named_modules() if isinstance(m, nn.Linear) and "intermediate" in n}
    return Task(
        name="MiniLM-L6",
        model=gm,
        calib=calib,
        stream=lambda s: _stream(pool, None, 16, 4 + s),
        val=_split(val, None, 32),
        test=_split(test, None, 32),
        metric=cosine_x100,
        loss=cosine_loss,
        taylor_loss=contrastive_loss,
        # Torch-Pruning cannot re-shape the traced attention heads: it prunes the MLP units only.
        ignored=lambda m: [
            mod for n, mod in m.named_modules() if n and n not in keep and not list(mod.children())
        ],
        heads=(),
        metric_name="cosine to the unpruned embedding × 100, held-out sentences",
        lr=5e-5,
        info={"seq": tq.SEQ, "test_sentences": len(test[0])},
    )
