"""Old import paths of the modules that moved into packages (``idap_fx.trace`` -> ``idap_fx.capture.trace``).

Kept for one release so user code and saved scripts keep importing; each old path is the
new module itself (``sys.modules`` alias), so ``mock.patch("idap_fx.latency.x")`` patches
the code that runs. Importing an old path warns with a ``DeprecationWarning``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from importlib.machinery import ModuleSpec
from types import ModuleType

_PACKAGES = {
    "capture": ("trace", "torch_export", "shapes", "hf"),
    "graph": ("layout", "dependency", "analysis", "ops", "modules"),
    "rewrite": ("surgery", "skip_candidates"),
    "method": ("skip_scores", "scoring", "schedule", "budget", "recovery", "distill_features", "collective",
               "allocate", "unit_cost"),
    "deploy": ("onnx_export", "latency", "serialize", "serialize_payload", "serialize_allowlist", "files",
               "visualize", "viewer_document", "viewer_blocks", "viewer_assets", "quantize", "plan_page"),
}  # fmt: skip
MOVED: dict[str, str] = {f"idap_fx.{m}": f"idap_fx.{p}.{m}" for p, mods in _PACKAGES.items() for m in mods}
MOVED["idap_fx.stats"] = "idap_fx.method.channel_stats"


def _new_name(old: str) -> str | None:
    """The new dotted name of ``old`` (a moved module or a module inside a moved package)."""
    for prefix, new in MOVED.items():
        if old == prefix or old.startswith(prefix + "."):
            return new + old[len(prefix) :]
    return None


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old path to the already-importable new module, with a DeprecationWarning."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> ModuleSpec | None:
        """A spec for an old path (checked before the path finders, which would load a second copy)."""
        return importlib.util.spec_from_loader(fullname, self) if _new_name(fullname) else None

    def create_module(self, spec: ModuleSpec) -> ModuleType:
        new = _new_name(spec.name)
        warnings.warn(
            f"{spec.name} moved to {new}; the old path goes in the next release", DeprecationWarning, 2
        )
        return importlib.import_module(new)  # type: ignore[arg-type]

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module is the new one, already executed."""


def install() -> None:
    """Alias the old paths: loaded modules at once (their names may be package attributes), the rest lazily."""
    for name, module in [(k, v) for k, v in sys.modules.items() if k.startswith("idap_fx.")]:
        old = next((o for o, n in MOVED.items() if name == n or name.startswith(n + ".")), None)
        if old is not None:
            sys.modules.setdefault(old + name[len(MOVED[old]) :], module)
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.insert(0, _Alias())
