"""Fold eval-mode BatchNorm into the Conv/Linear that feeds it (a torch.fx pass).

Why: after folding, a BatchNorm costs nothing at inference time and the exported
ONNX graph is smaller; pruning also sees one weight tensor per channel instead of
two coupled ones.

A BatchNorm site is folded when all of these hold (otherwise it is left alone):

* it is ``call_module`` of an ``nn.BatchNorm1d/2d/3d`` in eval mode with running
  statistics, or ``call_function`` ``F.batch_norm(..., training=False)`` whose
  statistics, weight and bias are ``get_attr`` nodes (or ``None``);
* its only input is a ``call_module`` ``nn.Conv1d/2d/3d`` or ``nn.Linear`` whose
  output has no other user, and that module object has no other call site
  (a shared conv would change its other call sites too);
* the channel counts match; for ``Linear`` the output must be known to be 2-D
  (``(N, C)``), because BatchNorm1d normalises dim 1, not the last dim: pass
  ``example_inputs`` (or run shape propagation beforehand) to fold those.

The arithmetic is torch's own ``torch.nn.utils.fusion.fuse_conv_bn_weights`` /
``fuse_linear_bn_weights`` (what ``fuse_conv_bn_eval`` / ``fuse_linear_bn_eval``
call), so module and functional BatchNorms share one code path.

The pass never mutates its input: it deep-copies the GraphModule first and
``ensures`` checks that the input's code and tensors are untouched.
"""

from __future__ import annotations

import copy
import operator
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from idap_fx.errors import IdapError

__all__ = ["FoldBatchNorm", "fold_batchnorm"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class _BNSite:
    """The inference-time parameters of one foldable BatchNorm node."""

    node: fx.Node
    input: fx.Node
    running_mean: torch.Tensor
    running_var: torch.Tensor
    eps: float
    weight: torch.Tensor | None
    bias: torch.Tensor | None


def _rank(node: fx.Node) -> int | None:
    """Rank of the tensor a node produces, if shape metadata is present."""
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        return len(meta.shape)
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else None


def _module_bn_site(gm: fx.GraphModule, node: fx.Node) -> _BNSite | None:
    bn = gm.get_submodule(node.target)
    if not isinstance(bn, _BATCHNORMS) or bn.training or bn.running_mean is None:
        return None
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return None
    return _BNSite(node, node.args[0], bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)


def _functional_bn_site(gm: fx.GraphModule, node: fx.Node) -> _BNSite | None:
    norm = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
    if norm is None:
        return None
    kw = norm.kwargs
    eps = kw.get("eps", 1e-5)  # F.batch_norm's defaults
    if kw.get("training", False) is not False or not isinstance(eps, float):
        return None
    if not isinstance(kw["input"], fx.Node):
        return None
    tensors = {}
    for key in ("running_mean", "running_var", "weight", "bias"):
        arg = kw.get(key)
        if arg is None and key in ("weight", "bias"):
            tensors[key] = None
        elif isinstance(arg, fx.Node) and arg.op == "get_attr":
            tensors[key] = operator.attrgetter(arg.target)(gm)
        else:
            return None
    return _BNSite(node, kw["input"], eps=eps, **tensors)


def _bn_site(gm: fx.GraphModule, node: fx.Node) -> _BNSite | None:
    """The BatchNorm parameters of ``node`` if it is an inference-mode BatchNorm."""
    if node.op == "call_module":
        return _module_bn_site(gm, node)
    if node.op == "call_function" and node.target is F.batch_norm:
        return _functional_bn_site(gm, node)
    return None


def _call_sites(gm: fx.GraphModule) -> Counter[int]:
    """id(module) -> how many call_module nodes run that module object (under any name)."""
    return Counter(id(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module")


def _target_in_use(graph: fx.Graph, target: str) -> bool:
    return any(
        n.op in ("call_module", "get_attr") and (n.target == target or n.target.startswith(target + "."))
        for n in graph.nodes
    )


def _fold(gm: fx.GraphModule, site: _BNSite, call_sites: Counter[int]) -> bool:
    """Fold one BatchNorm site into its producer; False when the pattern does not apply."""
    producer = site.input
    if producer.op != "call_module" or len(producer.users) != 1:
        return False
    layer = gm.get_submodule(producer.target)
    if not isinstance(layer, _CONVS + (nn.Linear,)) or call_sites[id(layer)] != 1:
        return False
    channels = site.running_mean.numel()
    weight = torch.ones_like(site.running_mean) if site.weight is None else site.weight
    bias = torch.zeros_like(site.running_mean) if site.bias is None else site.bias
    if isinstance(layer, nn.Linear):
        if layer.out_features != channels or _rank(producer) != 2:
            return False
        fuse = fuse_linear_bn_weights
    else:
        rank = _rank(producer)
        if layer.out_channels != channels or rank not in (None, layer.weight.dim()):
            return False
        fuse = fuse_conv_bn_weights
    with torch.no_grad():
        layer.weight, layer.bias = fuse(
            layer.weight, layer.bias, site.running_mean, site.running_var, site.eps, weight, bias
        )
    site.node.replace_all_uses_with(producer)
    dead_attrs = [n for n in site.node.all_input_nodes if n.op == "get_attr"]
    gm.graph.erase_node(site.node)
    for attr in dead_attrs:
        if not attr.users:
            gm.graph.erase_node(attr)
    if site.node.op == "call_module" and not _target_in_use(gm.graph, site.node.target):
        gm.delete_submodule(site.node.target)
    return True


def _fingerprint(gm: fx.GraphModule) -> tuple[str, tuple[tuple[str, int, int], ...]]:
    """The code and the identity/version of every tensor: changes iff gm was mutated."""
    tensors = gm.state_dict(keep_vars=True).items()
    return gm.code, tuple((name, id(t), t._version) for name, t in tensors)


class FoldBatchNorm(PassBase):
    """Fold inference-mode BatchNorms into the preceding Conv/Linear of a copy of the graph.

    ``example_inputs`` (optional) are used only to propagate shapes, which is
    needed to prove that a ``Linear -> BatchNorm1d`` pair is foldable.
    """

    def __init__(self, example_inputs: Sequence[torch.Tensor] | None = None) -> None:
        self.example_inputs = tuple(example_inputs) if example_inputs is not None else None
        self._input_fingerprint: tuple | None = None

    def requires(self, graph_module: fx.GraphModule) -> None:
        """The input must be a GraphModule; remember its state to check it is left untouched."""
        if not isinstance(graph_module, fx.GraphModule):
            raise TypeError(f"FoldBatchNorm needs a torch.fx.GraphModule, got {type(graph_module).__name__}")
        self._input_fingerprint = _fingerprint(graph_module)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        """Return ``PassResult(folded_copy, modified)``; the input is not modified."""
        gm = copy.deepcopy(graph_module)
        if self.example_inputs is not None:
            self._propagate_shapes(gm)
        call_sites = _call_sites(gm)
        folded = 0
        for node in list(gm.graph.nodes):
            site = _bn_site(gm, node)
            if site is not None and _fold(gm, site, call_sites):
                folded += 1
        if folded:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, folded > 0)

    def ensures(self, graph_module: fx.GraphModule) -> None:
        """The input GraphModule must be exactly as ``requires`` saw it."""
        if self._input_fingerprint is not None and _fingerprint(graph_module) != self._input_fingerprint:
            raise IdapError("FoldBatchNorm modified its input GraphModule; it must only change its copy")

    def _propagate_shapes(self, gm: fx.GraphModule) -> None:
        """Record output shapes in node.meta, running in eval mode so no BatchNorm statistic moves."""
        modes = {m: m.training for m in gm.modules()}
        gm.eval()
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(*self.example_inputs)
        finally:
            for m, training in modes.items():
                m.training = training


def fold_batchnorm(
    gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor] | None = None
) -> fx.GraphModule:
    """Return a copy of ``gm`` with every foldable inference-mode BatchNorm folded away."""
    return FoldBatchNorm(example_inputs)(gm).graph_module
