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

import numpy as np
import onnx_ir as ir

from normfold.exporter.provenance import module_path
from normfold.fusers import _graph as g
from normfold.fusers import _math
from normfold.fusers.base import NormfoldPass, register_pass

logger = logging.getLogger(__name__)

_AFFINE_OPS = ("Add", "Sub", "Mul", "Div")


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


@register_pass
class FoldAffineIntoPreceding(NormfoldPass):
    """``Conv/ConvTranspose/Gemm/MatMul → (Sub|Div|Mul|Add by per-channel constants)+`` → one layer.

    The rewritten layer (plus one Add for MatMul, which has no bias input) produces what the last
    absorbed op produced, so it carries that op's module path: the hand-written norm module.
    """

    name = "fold_affine"

    def run(self, model: ir.Model) -> bool:
        graph = model.graph
        modified = False
        layers = [n for n in graph if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and n.domain == ""]
        for layer in layers:
            if layer.graph is graph:
                modified |= self._visit(graph, layer)
        return modified

    def _chain(
        self, layer: ir.Node, rank: int | None, axis: int, channels: int
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

    def _visit(self, graph: ir.Graph, layer: ir.Node) -> bool:
        weight = layer.inputs[1] if len(layer.inputs) > 1 else None
        w = g.const_array(weight)
        if w is None or weight is None:
            return False
        layout = _layout(layer, w)
        if layout is None:
            return False
        rank, out_axis, w_axis, channels = layout
        ops, a, c, stop = self._chain(layer, rank, out_axis, channels)
        if not ops:
            if stop is not None:
                self.skipped((layer, *_next(layer)), stop)
            return False
        if layer.op_type == "MatMul" and all(op.op_type == "Add" for op in ops) and len(ops) == 1:
            return False  # a plain Linear (MatMul + bias Add): nothing to gain
        nodes = (layer, *ops)
        anchor = ops[0].name or ""
        if self.site_disabled(anchor):
            self.skipped(nodes, "disabled after failing verification")
            return False
        bias_value = layer.inputs[2] if layer.op_type != "MatMul" and len(layer.inputs) > 2 else None
        b = g.const_array(bias_value) if bias_value is not None else None
        if bias_value is not None and b is None:
            self.skipped(nodes, g.nonconst_reason(bias_value, f"{layer.op_type} bias"))
            return False
        shared = g.shared_weight_reason(weight, layer, self.ctx.allow_weight_copies)
        if shared:
            self.skipped(nodes, shared)
            return False
        if layer.op_type == "ConvTranspose":
            w64 = _math.scale_conv_transpose(w, a, g.attr_int(layer, "group", 1))
        else:
            w64 = _math.scale_output_channels(w, a, w_axis)
        beta = g.attr_float(layer, "beta", 1.0) if layer.op_type == "Gemm" else 1.0
        b64 = _math.fold_bias(None if b is None else beta * np.asarray(b, dtype=np.float64), a, c)
        try:
            w_new = _math.cast_checked(w64, w.dtype, "weight")
            b_new = _math.cast_checked(b64, b.dtype if b is not None else w.dtype, "bias")
        except _math.FoldOverflowError as e:
            self.skipped(nodes, f"{e}; the unfolded chain does not overflow, so it is kept")
            return False
        w_init = g.new_initializer(graph, w_new, weight.name)
        b_init = g.new_initializer(graph, b_new, bias_value.name if bias_value is not None else f"{weight.name}_bias")
        path = module_path(ops[-1])
        if layer.op_type == "MatMul":
            mm = g.clone_node(layer, [layer.inputs[0], w_init])
            new_nodes = [
                mm,
                ir.Node("", "Add", [mm.outputs[0], b_init], num_outputs=1, name=f"{ops[-1].name}_bias"),
            ]
        else:
            drop = ("beta",) if layer.op_type == "Gemm" else ()
            new_nodes = [g.clone_node(layer, [layer.inputs[0], w_init, b_init], drop_attrs=drop)]
        for node in new_nodes:
            g.stamp(node, ops[-1], path)
        g.swap(graph, [layer, *ops], new_nodes, ops[-1].outputs[0], new_nodes[-1].outputs[0])
        cloned = " (weight cloned: it is shared)" if g.other_users(weight, []) else ""
        self.applied(nodes, f"folded {len(ops)} per-channel op(s) into {layer.op_type}{cloned}")
        return True


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
