"""Fold per-channel constant Sub/Div/Mul/Add chains into the Conv, Gemm or MatMul before them.

A hand-written BatchNorm (``(x - mean) / sqrt(var + eps) * gamma + beta`` on buffers or plain tensor
attributes, zoo ``lenet_custom_bn``) exports to exactly such a chain. Each op with a per-channel constant
``k`` keeps the running form ``z = a·y + c`` affine:

    Add k: c += k      Sub k: c −= k      Sub(k, z): a, c = −a, k − c
    Mul k: a, c = a·k, c·k                Div k: a, c = a/k, c/k   (k ≠ 0)

and the chain folds like a BN: ``W' = W·a`` on the output-channel axis, ``B' = B·a + c``.

onnxscript's ``_fuse_conv_affine.py`` only takes *scalar* ``s``/``o`` on a Conv with a constant bias and
sums the offset over a 2-D kernel; it is not in the default rules. This pass takes per-channel tensors,
any conv rank, Gemm and MatMul, and stops at the first op that is not per-channel constant.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from normfold.fusers import _graph as g
from normfold.fusers import _math
from normfold.fusers._facts import GraphFacts
from normfold.fusers._fold import FoldRule, FoldSite, cloned_note, fold_layer
from normfold.fusers.base import Reject, Scope, register_rule

logger = logging.getLogger(__name__)

_AFFINE_OPS = ("Add", "Sub", "Mul", "Div")


@dataclass(frozen=True, eq=False)
class AffineSite(FoldSite):
    """``layer`` followed by per-channel ``ops`` that compute ``a·y + c`` (``a``, ``c`` in float64)."""

    ops: tuple[ir.Node, ...]
    a: np.ndarray
    c: np.ndarray
    w_axis: int


def _layout(layer: ir.Node, w: np.ndarray) -> tuple[int | None, int, int, int] | None:
    """``(output rank, channel axis of the output, weight axis of the channels, channels)``."""
    if layer.op_type == "Conv":
        return w.ndim, 1, 0, w.shape[0]
    if layer.op_type == "ConvTranspose":
        return w.ndim, 1, -1, w.shape[1] * g.attr_int(layer, "group", 1)
    if layer.op_type == "Gemm":
        axis = 0 if g.attr_int(layer, "transB", 0) else 1
        return 2, 1, axis, w.shape[axis]
    if layer.op_type == "MatMul" and w.ndim == 2:
        rank = None
        for value in (layer.outputs[0], layer.inputs[0]):
            if value is not None and value.shape is not None:
                rank = len(value.shape)
                break
        return rank, -1, 1, w.shape[1]
    return None


@register_rule
class FoldAffineIntoPreceding(FoldRule[AffineSite]):
    """``Conv/ConvTranspose/Gemm/MatMul → (Sub|Div|Mul|Add by per-channel constants)+`` → one layer.

    The rewritten layer (plus one Add for MatMul, which has no bias input) produces what the last
    absorbed op produced, so it carries that op's module path: the hand-written norm module.
    """

    name = "fold_affine"
    anchors = ("Conv", "ConvTranspose", "Gemm", "MatMul")
    kept = "chain"

    def match(self, facts: GraphFacts, node: ir.Node) -> AffineSite | Reject | None:
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        w = g.const_array(weight)
        layout = _layout(node, w) if w is not None else None
        if layout is None:
            return None
        rank, out_axis, w_axis, channels = layout
        ops, a, c, stop = _chain(node, rank, out_axis, channels)
        if not ops:
            return None if stop is None else Reject((node, *_next(node)), stop)
        if node.op_type == "MatMul" and len(ops) == 1 and ops[0].op_type == "Add":
            return None  # a plain Linear (MatMul + bias Add): nothing to gain
        bias = node.inputs[2] if node.op_type != "MatMul" and len(node.inputs) > 2 else None
        return AffineSite(
            nodes=(node, *ops),
            anchor=ops[0],
            layer=node,
            weight=weight,
            bias=bias,
            ops=tuple(ops),
            a=a,
            c=c,
            w_axis=w_axis,
        )

    def validate(self, site: AffineSite) -> str | None:
        layer, bias = site.layer, site.bias
        if bias is not None and site.bias_array is None:
            return g.nonconst_reason(bias, f"{layer.op_type} bias")
        assert site.weight is not None
        return g.shared_weight_reason(site.weight, layer, self.ctx.allow_weight_copies)

    def fold(self, site: AffineSite) -> tuple[np.ndarray, np.ndarray]:
        layer, a = site.layer, site.a
        w, b = site.arrays()
        if layer.op_type == "ConvTranspose":
            w64 = _math.scale_conv_transpose(w, a, g.attr_int(layer, "group", 1))
        else:
            w64 = _math.scale_output_channels(w, a, site.w_axis)
        beta = g.attr_float(layer, "beta", 1.0) if layer.op_type == "Gemm" else 1.0
        return w64, _math.fold_bias(None if b is None else beta * np.asarray(b, dtype=np.float64), a, site.c)

    def rewrite(self, scope: Scope, site: AffineSite) -> list[ir.Node]:
        layer, last = site.layer, site.ops[-1]
        arrays = self.folded_weights(site)
        new = fold_layer(scope, site, layer.inputs[0], arrays, source=last, add_name=f"{last.name}_bias")
        g.swap(scope.graph, [layer, *site.ops], new, last.outputs[0], new[-1].outputs[0])
        return new

    def describe(self, site: AffineSite, created: list[ir.Node]) -> str:
        return f"folded {len(site.ops)} per-channel op(s) into {site.layer.op_type}{cloned_note(site.weight)}"


def _chain(
    layer: ir.Node, rank: int | None, axis: int, channels: int
) -> tuple[list[ir.Node], np.ndarray, np.ndarray, str | None]:
    """Walk the single-consumer chain after ``layer``; returns (ops, a, c, reason it stopped)."""
    a, c = np.ones(channels), np.zeros(channels)
    ops: list[ir.Node] = []
    cur = layer.outputs[0]
    while True:
        node = g.sole_consumer(cur)
        if node is None or node.op_type not in _AFFINE_OPS or node.domain != "" or len(node.inputs) != 2:
            return ops, a, c, None
        other_index = 1 if node.inputs[0] is cur else 0
        other = node.inputs[other_index]
        k_arr = g.const_array(other)
        if k_arr is None:
            return ops, a, c, _input_reason(node, other, rank, axis, channels)
        k = g.per_channel(k_arr, rank, axis, channels)
        if k is None:
            return ops, a, c, f"{node.op_type} constant of shape {list(k_arr.shape)} is not per-channel"
        op, swapped = node.op_type, other_index == 0
        if op == "Add":
            c = c + k
        elif op == "Mul":
            a, c = a * k, c * k
        elif op == "Sub" and not swapped:
            c = c - k
        elif op == "Sub":
            a, c = -a, k - c
        elif op == "Div" and not swapped and np.all(k != 0):
            a, c = a / k, c / k
        else:
            return ops, a, c, None
        ops.append(node)
        cur = node.outputs[0]


def _input_reason(node: ir.Node, other: ir.Value | None, rank: int | None, axis: int, channels: int) -> str | None:
    """A skip reason when ``other`` looks like per-channel statistics fed as a graph input (a residual
    input of the activation's shape is no candidate at all)."""
    if other is None or not other.is_graph_input() or other.shape is None:
        return None
    dims = [d if isinstance(d, int) else -1 for d in other.shape]
    if -1 in dims or g.per_channel(np.ones(dims), rank, axis, channels) is None:
        return None
    return g.nonconst_reason(other, f"{node.op_type} operand")


def _next(layer: ir.Node) -> tuple[ir.Node, ...]:
    node = g.sole_consumer(layer.outputs[0])
    return (node,) if node is not None else ()
