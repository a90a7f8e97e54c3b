"""Op semantics for the dependency analysis (see ``registry``); importing this fills the registry."""

from idap_fx.graph.ops import (  # noqa: F401
    aten,
    attention,
    creation,
    elementwise,
    functional,
    indexing,
    joins,
    layers,
    linalg,
    mixing,
    shape,
)
from idap_fx.graph.ops.registry import FUNCTION_RULES, METHOD_RULES, MODULE_RULES, Rule, lookup, register

__all__ = ["FUNCTION_RULES", "METHOD_RULES", "MODULE_RULES", "Rule", "lookup", "register"]
