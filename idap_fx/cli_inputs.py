"""What the ``idap-fx`` command reads: model specs, weights, calibration data, leaf modules.

Kept apart from the argument parsing so the loaders can be tested and reused. Every bad
input raises ``UsageError`` (exit code 2) naming the option and the value; nothing here
downloads anything: torchvision weights come from the local torch hub cache only.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from torch import nn

from idap_fx.errors import IdapError

SEED = 0  # random initialisation and synthetic calibration are seeded: the same command gives the same model


class UsageError(IdapError):
    """Bad command-line input (model spec, file, shape)."""


@dataclass
class LoadedModel:
    """A model to optimize, the input shape it was saved with (``.pt2``) and what the user must know."""

    model: nn.Module | torch.export.ExportedProgram
    input_shape: tuple[int, ...] | None = None
    warnings: list[str] = field(default_factory=list)


def ensure_cwd_importable() -> None:
    """Make ``package.module:callable`` specs resolve from the current directory, as ``python -m`` does."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def _import_callable(spec: str, option: str) -> Any:
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise UsageError(
            f"{option} {spec!r}: cannot load it ({exc}); run idap-fx from the folder above {module.split('.')[0]!r}"
        ) from exc


def _torchvision(name: str) -> nn.Module:
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join('torchvision:' + c for c in close)}?" if close else ""
        raise UsageError(f"torchvision has no model {name!r}{hint} (see torchvision.models.list_models())")
    kw: dict[str, Any] = (
        {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    )
    return torchvision.models.get_model(name, weights=None, **kw)


def _hub_checkpoint(name: str, enum_name: str) -> str:
    """Path of torchvision's ``name`` weights ``enum_name`` in the local hub cache (never downloaded)."""
    import torchvision

    try:
        weights = getattr(torchvision.models.get_model_weights(name), enum_name)
    except (AttributeError, ValueError, KeyError):
        choices = [w.name for w in torchvision.models.get_model_weights(name)]
        raise UsageError(
            f"--weights {enum_name}: torchvision:{name} has weights {choices + ['DEFAULT']}"
        ) from None
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path))
    if not os.path.isfile(path):
        raise UsageError(
            f"--weights {enum_name}: {path} is not in the local torch hub cache and idap-fx downloads nothing; "
            f"fetch it once where there is network (torchvision.models.get_model({name!r}, weights={enum_name!r})) "
            "and copy the file there (TORCH_HOME moves the cache), or pass a saved state dict: --weights PATH"
        )
    return path


def load_state_dict(model: nn.Module, path: str) -> None:
    """Load a state dict, or a checkpoint dict holding one under 'state_dict' / 'model', with weights_only."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickled classes, corrupt files: weights_only refuses them
        raise UsageError(
            f"--weights {path}: not a weights-only PyTorch checkpoint ({type(exc).__name__}: {exc})"
        ) from None
    if isinstance(data, dict):
        for key in ("state_dict", "model"):
            if isinstance(data.get(key), dict):
                data = data[key]
                break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise UsageError(
            f"--weights {path}: expected a state dict (name -> tensor), found {type(data).__name__}"
        )
    if data and all(k.startswith("module.") for k in data):  # saved from DataParallel / DDP
        data = {k[len("module.") :]: v for k, v in data.items()}
    result = model.load_state_dict(data, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UsageError(
            f"--weights {path} does not fit the model: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def load_model(spec: str, weights: str | None = None) -> LoadedModel:
    """``torchvision:NAME``, ``timm:NAME``, ``package.module:callable`` or a ``torch.export`` ``.pt2`` file.

    ``weights``: a state-dict / checkpoint path, or for torchvision a weight enum name
    (``IMAGENET1K_V1``, ``DEFAULT``) read from the local hub cache. Without weights a
    torchvision / timm model is randomly initialised (seeded) and a warning says so.
    """
    if spec.endswith(".pt2"):
        if not os.path.isfile(spec):
            raise UsageError(f"model {spec}: no such file")
        if weights:
            raise UsageError("--weights does not apply to a .pt2 program: its weights are saved inside it")
        try:
            ep = torch.export.load(spec)
        except Exception as exc:
            raise UsageError(
                f"model {spec}: not a torch.export program ({type(exc).__name__}: {exc})"
            ) from None
        args = (ep.example_inputs or ((), {}))[0]
        shape = tuple(args[0].shape) if len(args) == 1 and isinstance(args[0], torch.Tensor) else None
        return LoadedModel(ep, shape)
    kind, _, name = spec.partition(":")
    if not name:
        raise UsageError(
            f"model {spec!r}: use torchvision:NAME, timm:NAME, package.module:callable or FILE.pt2"
        )
    torch.manual_seed(SEED)
    if kind == "torchvision":
        model = _torchvision(name)
        if weights and not os.path.exists(weights) and re.fullmatch(r"[A-Z][A-Z0-9_]*", weights):
            weights = _hub_checkpoint(name, weights)
    elif kind == "timm":
        try:
            import timm
        except ImportError:
            raise UsageError("timm:NAME needs timm installed (pip install timm)") from None
        model = timm.create_model(name, pretrained=False)
    else:
        model = _import_callable(spec, "model")()
        if not isinstance(model, nn.Module):
            raise UsageError(f"{spec} returned a {type(model).__name__}, not an nn.Module")
    warnings = []
    if weights:
        if not os.path.isfile(weights):
            raise UsageError(f"--weights {weights}: no such file")
        load_state_dict(model, weights)
    elif kind in ("torchvision", "timm"):
        warnings.append(
            f"{spec} has RANDOM weights (no --weights given): the pruned model is only good for timing; "
            "pass --weights PATH (state dict) or a torchvision weight name such as IMAGENET1K_V1"
        )
    return LoadedModel(model.eval(), None, warnings)


def load_calibration(spec: str, shape: tuple[int, ...], batch: int = 8) -> list[Any]:
    """Batches from a folder of images, a .pt / .npy tensor (N, *shape[1:]) or ``module:fn`` returning batches."""
    if not os.path.exists(spec) and re.fullmatch(r"[\w.]+:\w+", spec):
        batches = list(_import_callable(spec, "--calibration")())
        if not batches:
            raise UsageError(f"--calibration {spec}: the callable returned no batches")
        return batches
    if not os.path.exists(spec):
        raise UsageError(f"--calibration {spec}: no such file or directory (nor a module:function)")
    if os.path.isdir(spec):
        data = _images(spec, shape)
    elif spec.endswith(".npy"):
        data = torch.from_numpy(np.load(spec, allow_pickle=False)).float()
    elif spec.endswith(".pt"):
        data = torch.load(spec, weights_only=True)
        if not isinstance(data, torch.Tensor):
            raise UsageError(f"--calibration {spec}: expected one tensor, found {type(data).__name__}")
    else:
        raise UsageError(
            f"--calibration {spec}: give a folder of images, a .pt or .npy file, or module:function"
        )
    if tuple(data.shape[1:]) != tuple(shape[1:]):
        raise UsageError(
            f"--calibration {spec}: samples have shape {tuple(data.shape[1:])}, the model takes {shape[1:]}"
        )
    return list(data.split(batch))


def _images(folder: str, shape: tuple[int, ...]) -> torch.Tensor:
    from PIL import Image
    from torchvision.transforms import v2

    files = sorted(f for f in os.listdir(folder) if f.lower().endswith((".png", ".jpg", ".jpeg", ".bmp")))
    if not files:
        raise UsageError(f"--calibration {folder}: the folder holds no .png/.jpg/.bmp images")
    tf = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(shape[-2:], antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    return torch.stack([tf(Image.open(os.path.join(folder, f)).convert("RGB")) for f in files])


def synthetic_input(shape: tuple[int, ...]) -> torch.Tensor:
    """A seeded N(0, 1) batch: the example input, and the calibration when none is given."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(SEED))


def leaf_module_types(model: Any, names: Sequence[str]) -> list[type]:
    """``--leaf-module`` values (class names found in the model, or ``package.module:Class``) as types."""
    found = {type(m).__name__: type(m) for m in model.modules()} if isinstance(model, nn.Module) else {}
    out = []
    for n in names:
        if ":" in n:
            cls = _import_callable(n, "--leaf-module")
        elif n in found:
            cls = found[n]
        else:
            close = difflib.get_close_matches(n, list(found), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UsageError(f"--leaf-module {n}: the model has no module of that class{hint}")
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise UsageError(f"--leaf-module {n}: not an nn.Module class")
        out.append(cls)
    return out
