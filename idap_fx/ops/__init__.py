"""Op semantics for the dependency analysis (see ``registry``); importing this fills the registry."""

from idap_fx.ops import aten, attention, creation, elementwise, functional, layers, linalg, mixing, shape  # noqa: F401
from idap_fx.ops.registry import FUNCTION_RULES, METHOD_RULES, MODULE_RULES, Rule, lookup, register

__all__ = ["FUNCTION_RULES", "METHOD_RULES", "MODULE_RULES", "Rule", "lookup", "register"]
