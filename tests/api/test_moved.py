"""The old module paths (before the package layout) still import, as the new modules themselves."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest

from idap_fx.deploy.serialize_allowlist import class_path, resolve_class
from idap_fx.graph.modules import PrunedMultiheadAttention
from idap_fx.moved import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_is_the_new_module(old: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert importlib.import_module(old) is importlib.import_module(MOVED[old])


def test_public_functions_survive_old_imports() -> None:
    """``import idap_fx.trace`` must not replace the function ``idap_fx.trace`` with the module."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import idap_fx.trace  # noqa: F401
        import idap_fx.visualize  # noqa: F401
    assert callable(idap_fx.trace) and callable(idap_fx.visualize)


def test_lazy_old_path_warns_and_loads_one_copy() -> None:
    """In a fresh process: an old path not yet loaded warns once and does not run the module twice."""
    code = (
        "import warnings, sys\n"
        "warnings.simplefilter('error', DeprecationWarning)\n"
        "import idap_fx\n"
        "try:\n"
        "    import idap_fx.quantize\n"
        "except DeprecationWarning as w:\n"
        "    print('warned:', w)\n"
        "warnings.simplefilter('ignore', DeprecationWarning)\n"
        "import idap_fx.quantize as old, idap_fx.deploy.quantize as new\n"
        "import idap_fx.ops.registry as o, idap_fx.graph.ops.registry as n\n"
        "print(old is new, o is n)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "warned: idap_fx.quantize moved to idap_fx.deploy.quantize" in out
    assert out.strip().endswith("True True")


def test_files_saved_with_the_old_module_path_load() -> None:
    assert resolve_class("idap_fx.modules.PrunedMultiheadAttention") is PrunedMultiheadAttention
    assert class_path(PrunedMultiheadAttention) == "idap_fx.graph.modules.PrunedMultiheadAttention"
