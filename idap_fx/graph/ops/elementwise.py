"""Element-wise ops: channels pass straight through; several tensor inputs are coupled.

Broadcasting lines dims up from the right, so a residual ``x + f(x)``, an SE gate
``x * s[:, :, None, None]`` or a layer-scale ``gamma * x`` couple channel ``i`` of
every input. Every ATen overload tagged ``torch.Tag.pointwise`` without a rule of its
own (``expm1``, ``min.other``, ``lerp`` ...) takes this rule.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from idap_fx.graph.layout import Layout
from idap_fx.graph.ops.merge import Operand, merge, to_layout
from idap_fx.graph.ops.registry import register, register_tag

UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)  # fmt: skip
FUNCTIONS = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow, operator.iadd,
    operator.isub, operator.imul, operator.itruediv,
    torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.where, torch.relu,
    torch.sigmoid, torch.tanh, torch.exp, torch.sqrt, torch.cos, torch.sin, torch.rsqrt, torch.abs, torch.neg, torch.clamp,
    torch.clip, torch.erf, torch.pow, torch.square, torch.sign, torch.nan_to_num, torch.addcmul, torch.addcdiv,
    torch.lerp, torch.log, torch.reciprocal, torch.masked_fill,
    operator.lt, operator.le, operator.gt, operator.ge, operator.eq, operator.ne, operator.and_, operator.or_,
    operator.xor, operator.invert, torch.eq, torch.ne, torch.lt, torch.le, torch.gt, torch.ge,
    torch.logical_and, torch.logical_or, torch.logical_not,
    F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.leaky_relu, F.elu,
    F.selu, F.celu, F.mish, F.softplus, F.hardtanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.alpha_dropout,
    torch.relu_, torch.sigmoid_, torch.tanh_, torch.clamp_, F.relu_, F.elu_, F.leaky_relu_, F.hardtanh_,
)  # fmt: skip
METHODS = (
    "add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_", "relu", "relu_", "sigmoid", "sigmoid_",
    "tanh", "tanh_", "exp", "sqrt", "cos", "sin", "rsqrt", "abs", "neg", "clamp", "clamp_", "clip", "pow", "square",
    "contiguous", "clone", "detach", "float", "half", "double", "bfloat16", "to", "type", "type_as",
    "masked_fill", "masked_fill_", "where", "maximum", "minimum", "erf", "sign", "nan_to_num",
    "expand_as", "bool", "long", "int", "eq", "ne", "lt", "le", "gt", "ge", "logical_not", "logical_and", "logical_or",
    "addcmul", "addcdiv", "lerp", "log", "reciprocal",
)  # fmt: skip
WRAPPED = ("timm.layers.attention.maybe_add_mask",)  # ``scores`` (+ ``attn_mask`` when given)


@register_tag(torch.Tag.pointwise)
@register(*UNARY_MODULES, *FUNCTIONS, *METHODS, *WRAPPED)
def _elementwise(ctx, node: fx.Node) -> Layout:
    """Couple every tensor input, broadcast from the right, into the output's dims."""
    out = ctx.shape(node)
    nd = len(out)
    operands = []
    for arg in node.all_input_nodes:
        value = ctx.value(arg)
        if isinstance(value, Layout):
            shape = ctx.shape(arg)
            off = nd - len(shape)
            if off < 0:
                raise ValueError("input has more dims than the output")
            operands.append(Operand(value, shape, {d: d + off for d in range(len(shape))}))
    return to_layout(nd, merge(ctx.coupling, node.name, operands), {d: d for d in range(nd)})
