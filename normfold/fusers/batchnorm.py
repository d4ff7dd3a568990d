"""BatchNormalization folding: into the layer before it, into the Conv after it, or kept as is.

In inference mode ``BN(y) = s·y + t`` per channel with ``s = γ/√(σ²+ε)``, ``t = β − μ·s``; the
weight algebra lives in :mod:`normfold.fusers._math`.

Why not just onnxscript's ``rules/common/_fuse_batchnorm.py`` (NORMS.md §2)? It is correct for the
plain ``BN(Conv)``, ``BN(ConvTranspose)`` and ``BN(Gemm)`` cases, but it

* does not check ``training_mode``: a training BN (3 outputs, batch statistics) is folded with the
  running statistics, which changes the result;
* folds in the initializer dtype (fp16 arithmetic for fp16 models) and never checks for overflow;
* names the fused initializer after the old one, so it can only refuse shared weights, never clone;
* does not match ``MatMul(+Add)``, ``Linear→Transpose→BN1d``, or BN *before* a Conv;
* fails on Identity-aliased BN parameters (the TorchScript exporter's deduplication);
* reports nothing about why a candidate was not folded.

So these passes are our own, with the same algebra, fp64 math, fresh initializers and a reason for
every skipped candidate.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import onnx_ir as ir

from normfold.exporter.provenance import module_path
from normfold.fusers import _graph as g
from normfold.fusers import _math
from normfold.fusers.base import NormfoldPass, register_pass

logger = logging.getLogger(__name__)

TRAINING_REASON = (
    "training-mode BN ({detail}): it normalizes with batch statistics, so folding the running "
    "statistics would change the result"
)


def bn_affine(bn: ir.Node) -> tuple[np.ndarray, np.ndarray] | str:
    """``(s, t)`` of an inference-mode BN with constant parameters, or the reason it has none."""
    if g.attr_int(bn, "training_mode", 0) != 0:
        return TRAINING_REASON.format(detail="training_mode=1")
    if len(bn.outputs) > 1:
        return TRAINING_REASON.format(detail=f"{len(bn.outputs)} outputs")
    if g.attr_int(bn, "spatial", 1) == 0:
        return "BN-7 with spatial=0 normalizes per element, not per channel"
    params = []
    for index, what in enumerate(("scale", "bias", "running_mean", "running_var"), start=1):
        value = bn.inputs[index] if index < len(bn.inputs) else None
        array = g.const_array(value)
        if array is None:
            return g.nonconst_reason(value, f"BN {what}")
        params.append(array)
    eps = g.attr_float(bn, "epsilon", 1e-5)
    sizes = {p.size for p in params}
    if len(sizes) != 1:
        return f"BN parameters have different lengths {sorted(sizes)}"
    return _math.bn_scale_shift(*params, eps)


def _batchnorms(graph: ir.Graph) -> list[ir.Node]:
    return [n for n in graph if n.op_type == "BatchNormalization" and n.domain == ""]


def _alive(node: ir.Node, graph: ir.Graph) -> bool:
    return node.graph is graph


class _BatchNormRule(NormfoldPass):
    """Visits every live BatchNormalization once per run; subclasses decide what to do with each."""

    def run(self, model: ir.Model) -> bool:
        graph = model.graph
        modified = False
        for bn in _batchnorms(graph):
            if _alive(bn, graph):
                modified |= self._visit(graph, bn)
        return modified

    def _visit(self, graph: ir.Graph, bn: ir.Node) -> bool:
        raise NotImplementedError

    def _affine(self, bn: ir.Node, nodes: tuple[ir.Node, ...]) -> tuple[np.ndarray, np.ndarray] | None:
        """BN's ``(s, t)``, or None with the skip recorded (site disabled by verification, or BN not foldable)."""
        if self.site_disabled(bn.name or ""):
            self.skipped(nodes, "disabled after failing verification")
            return None
        affine = bn_affine(bn)
        if isinstance(affine, str):
            self.skipped(nodes, affine)
            return None
        return affine


def _folded_initializers(
    pass_: NormfoldPass,
    graph: ir.Graph,
    nodes: list[ir.Node],
    weight: ir.Value,
    bias_value: ir.Value | None,
    dtypes: tuple[np.dtype, np.dtype],
    w64: np.ndarray,
    b64: np.ndarray,
) -> tuple[ir.Value, ir.Value] | None:
    """Cast the float64 fold to the initializers' dtypes and add them as *new* initializers (never in
    place: the exporter may alias them with BN statistics). None, with the skip recorded, when a folded
    value would overflow its dtype."""
    try:
        w_new = _math.cast_checked(w64, dtypes[0], "weight")
        b_new = _math.cast_checked(b64, dtypes[1], "bias")
    except _math.FoldOverflowError as e:
        pass_.skipped(nodes, f"{e}; the unfolded BN does not overflow, so it is kept")
        return None
    bias_name = f"{weight.name}_bias" if bias_value is None else bias_value.name
    return g.new_initializer(graph, w_new, weight.name), g.new_initializer(graph, b_new, bias_name)


@register_pass
class FuseBatchNormIntoConv(_BatchNormRule):
    """``BN(Conv(x, W, B))`` → ``Conv(x, W', B')`` and the same for ConvTranspose.

    Conv weight ``(Cout, Cin/g, *k)``: ``W' = W·s[o]`` on axis 0. ConvTranspose weight
    ``(Cin, Cout/g, *k)``: output channel ``o = gi·Cout/g + j`` is column ``j`` of group ``gi``'s rows,
    so ``s`` is reshaped to ``(g, Cout/g)``. Both: ``B' = B·s + t`` (absent ``B`` = 0). Any rank
    (1d/2d/3d), dilation and strides are irrelevant to the algebra. The fused conv produces what the BN
    produced, so it carries the BN's module path.
    """

    name = "fuse_bn_into_conv"

    def _visit(self, graph: ir.Graph, bn: ir.Node) -> bool:
        y = bn.inputs[0]
        conv = y.producer() if y is not None else None
        if y is None or conv is None or conv.op_type not in ("Conv", "ConvTranspose") or conv.domain != "":
            return False
        nodes = (conv, bn)
        affine = self._affine(bn, nodes)
        if affine is None:
            return False
        s, t = affine
        if g.sole_consumer(y) is not bn:
            self.skipped(nodes, f"{conv.op_type} output '{y.name}' has other consumers besides the BN")
            return False
        weight = conv.inputs[1]
        w = g.const_array(weight)
        if w is None or weight is None:
            self.skipped(nodes, g.nonconst_reason(weight, f"{conv.op_type} weight"))
            return False
        bias_value = conv.inputs[2] if len(conv.inputs) > 2 else None
        b = g.const_array(bias_value) if bias_value is not None else None
        if bias_value is not None and b is None:
            self.skipped(nodes, g.nonconst_reason(bias_value, f"{conv.op_type} bias"))
            return False
        shared = g.shared_weight_reason(weight, conv, self.ctx.allow_weight_copies)
        if shared:
            self.skipped(nodes, shared)
            return False
        group = g.attr_int(conv, "group", 1)
        cout = w.shape[0] if conv.op_type == "Conv" else w.shape[1] * group
        if cout != s.size or (conv.op_type == "ConvTranspose" and w.shape[0] % group):
            self.skipped(nodes, f"BN has {s.size} channels but the {conv.op_type} produces {cout}")
            return False
        if conv.op_type == "Conv":
            w64 = _math.scale_output_channels(w, s, 0)
        else:
            w64 = _math.scale_conv_transpose(w, s, group)
        b64 = _math.fold_bias(b, s, t)
        dtypes = (w.dtype, b.dtype if b is not None else w.dtype)
        inits = _folded_initializers(self, graph, nodes, weight, bias_value, dtypes, w64, b64)
        if inits is None:
            return False
        new = g.clone_node(conv, [conv.inputs[0], *inits])
        g.stamp(new, bn, module_path(bn))
        g.swap(graph, [conv, bn], [new], bn.outputs[0], new.outputs[0])
        cloned = " (weight cloned: it is shared)" if g.other_users(weight, []) else ""
        self.applied(nodes, f"folded into {conv.op_type}{cloned}")
        return True


def _feature_layer(y: ir.Value) -> tuple[list[ir.Node], ir.Node | None]:
    """Walk up from the BN input: optional Transpose, optional Add(bias), then Gemm or MatMul.

    Returns ``(chain, layer)``: ``chain`` the nodes between the layer's output and the BN (layer side
    first), ``layer`` the Gemm/MatMul, or None when this BN is no candidate for this rule.
    """
    chain: list[ir.Node] = []
    node = y.producer()
    if node is not None and node.op_type == "Transpose" and node.domain == "":
        chain.insert(0, node)
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
    if node is not None and node.op_type == "Add" and node.domain == "":
        mm = [v.producer() for v in node.inputs if v is not None and v.producer() is not None]
        mm = [p for p in mm if p.op_type == "MatMul" and p.domain == ""]
        if not mm:
            return chain, None
        chain.insert(0, node)
        node = mm[0]
    if node is None or node.op_type not in ("Gemm", "MatMul") or node.domain != "":
        return chain, None
    if node.op_type == "Gemm" and any(c.op_type == "Add" for c in chain):
        return chain, None
    return chain, node


@register_pass
class FuseBatchNormIntoGemm(_BatchNormRule):
    """``BN(Gemm)``, ``BN(MatMul(+Add))`` and ``BN(Transpose(MatMul+Add))`` (Linear→BatchNorm1d).

    The feature axis of ``Y = α·A·B + β·C`` is N: ``B`` is ``(K, N)`` for transB=0 (scale axis 1) and
    ``(N, K)`` for transB=1 (axis 0). ``s·Y + t = α·A·(B·s) + (β·C·s + t)``, so ``B' = B·s``,
    ``C' = β·C·s + t`` and β becomes 1. For ``MatMul(A, W(K, N)) (+ b)``: ``W' = W·s`` on axis 1,
    ``b' = b·s + t`` (a new Add when there was none).

    BN normalizes axis 1. That is the layer's feature (last) axis only for a rank-2 output, or when a
    Transpose in between moves the last axis to position 1 (Linear on (N, L, C) → transpose → BN1d on
    (N, C, L)). Otherwise the BN scales along rows the weights do not have, and it is skipped with
    that reason (the standalone rule then keeps it).
    """

    name = "fuse_bn_into_gemm"

    def _visit(self, graph: ir.Graph, bn: ir.Node) -> bool:
        y = bn.inputs[0]
        if y is None:
            return False
        chain, layer = _feature_layer(y)
        if layer is None:
            return False
        nodes = (layer, *chain, bn)
        affine = self._affine(bn, nodes)
        if affine is None:
            return False
        s, t = affine
        # every intermediate value must feed exactly the next node of the chain
        path = [layer, *chain, bn]
        for producer, consumer in itertools.pairwise(path):
            if g.sole_consumer(producer.outputs[0]) is not consumer:
                self.skipped(nodes, f"'{producer.outputs[0].name}' has other consumers besides the BN chain")
                return False
        transpose = next((c for c in chain if c.op_type == "Transpose"), None)
        add = next((c for c in chain if c.op_type == "Add"), None)
        if transpose is not None:
            perm = g.attr_ints(transpose, "perm")
            rank = len(perm) if perm is not None else None
            if perm is None or rank is None or rank < 2 or perm[1] != rank - 1:
                self.skipped(nodes, f"Transpose perm {perm} does not move the layer's feature axis to the BN axis 1")
                return False
        else:
            rank = 2 if layer.op_type == "Gemm" else _rank(layer, y)
            if rank != 2:
                self.skipped(
                    nodes,
                    f"BN normalizes axis 1 of a rank-{rank} {layer.op_type} output, not the layer's feature "
                    "(last) axis: the scale cannot move into the weights",
                )
                return False
        weight = layer.inputs[1]
        w = g.const_array(weight)
        if w is None or weight is None:
            self.skipped(nodes, g.nonconst_reason(weight, f"{layer.op_type} weight"))
            return False
        if w.ndim != 2:
            self.skipped(nodes, f"{layer.op_type} weight has rank {w.ndim}, expected 2")
            return False
        shared = g.shared_weight_reason(weight, layer, self.ctx.allow_weight_copies)
        if shared:
            self.skipped(nodes, shared)
            return False
        if layer.op_type == "Gemm":
            trans_b = g.attr_int(layer, "transB", 0)
            axis = 0 if trans_b else 1
            bias_value = layer.inputs[2] if len(layer.inputs) > 2 else None
            beta = g.attr_float(layer, "beta", 1.0)
        else:
            axis = 1
            bias_value = next((v for v in add.inputs if v is not layer.outputs[0]), None) if add else None
            beta = 1.0
        if w.shape[axis] != s.size:
            self.skipped(nodes, f"BN has {s.size} channels but the {layer.op_type} produces {w.shape[axis]}")
            return False
        b = g.const_array(bias_value) if bias_value is not None else None
        if bias_value is not None and b is None:
            self.skipped(nodes, g.nonconst_reason(bias_value, f"{layer.op_type} bias"))
            return False
        if b is not None and add is not None and not _is_feature_bias(b, s.size):
            self.skipped(nodes, f"Add operand of shape {list(b.shape)} is not a per-feature bias")
            return False
        w64 = _math.scale_output_channels(w, s, axis)
        b64 = _math.fold_bias(None if b is None else beta * np.asarray(b, dtype=np.float64), s, t)
        dtypes = (w.dtype, b.dtype if b is not None else w.dtype)
        inits = _folded_initializers(self, graph, nodes, weight, bias_value, dtypes, w64, b64)
        if inits is None:
            return False
        path_name = module_path(bn)
        w_init, b_init = inits
        if layer.op_type == "Gemm":
            new_nodes = [g.clone_node(layer, [layer.inputs[0], w_init, b_init], drop_attrs=("beta",))]
        else:
            mm = g.clone_node(layer, [layer.inputs[0], w_init])
            add_name = add.name if add is not None else f"{bn.name}_bias"
            new_nodes = [mm, ir.Node("", "Add", [mm.outputs[0], b_init], num_outputs=1, name=add_name)]
        for node in new_nodes:
            g.stamp(node, bn, path_name)
        out = new_nodes[-1].outputs[0]
        old = [layer, *([add] if add else [])]
        if transpose is not None:
            # keep the Transpose: it now reads the folded layer and produces what the BN produced
            graph.insert_before(layer, new_nodes)
            out.type, out.shape = old[-1].outputs[0].type, old[-1].outputs[0].shape
            transpose.replace_input_with(0, out)
            graph.remove(old, safe=True)
            _route(graph, bn, transpose.outputs[0])
        else:
            g.swap(graph, [*old, bn], new_nodes, bn.outputs[0], out)
        cloned = " (weight cloned: it is shared)" if g.other_users(weight, []) else ""
        self.applied(nodes, f"folded into {layer.op_type}{cloned}")
        return True


def _is_feature_bias(b: np.ndarray, channels: int) -> bool:
    """A MatMul bias that varies along the last axis only: ``(C,)``, ``(1, C)``, a scalar …"""
    return (b.ndim <= 1 and b.size in (1, channels)) or (
        all(d == 1 for d in b.shape[:-1]) and b.shape[-1] in (1, channels)
    )


def _route(graph: ir.Graph, bn: ir.Node, replacement: ir.Value) -> None:
    """Route readers of the BN output to ``replacement`` (taking over its name) and delete the BN."""
    old_out = bn.outputs[0]
    name = old_out.name
    replacement.type = old_out.type if old_out.type is not None else replacement.type
    replacement.shape = old_out.shape if old_out.shape is not None else replacement.shape
    ir.convenience.replace_all_uses_with(old_out, replacement, replace_graph_outputs=True)
    graph.remove(bn, safe=True)
    old_out.name = None
    replacement.name = name


def _rank(layer: ir.Node, y: ir.Value) -> int | None:
    for value in (y, layer.outputs[0], layer.inputs[0]):
        if value is not None and value.shape is not None:
            return len(value.shape)
    return None


@register_pass
class FuseBatchNormIntoNextConv(_BatchNormRule):
    """``Conv(BN(x), W, B)`` → ``Conv(x, W', B')`` when the conv has no padding.

    With ``k = Cin/g`` input channels per group and ``gi = o // (Cout/g)``:
    ``W'[o, j] = W[o, j]·s[gi·k + j]`` and ``B'[o] = B[o] + Σ_{j,spatial} W[o, j]·t[gi·k + j]``.
    Exact only when every pad is zero (auto_pad NOTSET or VALID): the original pads the *normalized*
    tensor with zeros, the folded conv would pad the raw one, which differs by ``t`` at the borders
    (NORMS.md §5 measured a max error of 2.8 on outputs of magnitude 5.3). The new conv still produces
    the conv module's output, so it keeps the conv's module path.
    """

    name = "fuse_bn_into_next_conv"

    def _visit(self, graph: ir.Graph, bn: ir.Node) -> bool:
        out = bn.outputs[0]
        readers = [u.node for u in out.uses()]
        convs = [n for n in readers if n.op_type == "Conv" and n.domain == ""]
        if not convs:
            return False
        conv = convs[0]
        nodes = (bn, conv)
        affine = self._affine(bn, nodes)
        if affine is None:
            return False
        if g.sole_consumer(out) is not conv or conv.inputs[0] is not out:
            self.skipped(nodes, f"BN output '{out.name}' has other consumers besides the Conv input")
            return False
        pads = g.attr_ints(conv, "pads") or []
        auto_pad = g.attr_str(conv, "auto_pad", "NOTSET")
        if any(pads) or auto_pad not in ("NOTSET", "VALID"):
            self.skipped(
                nodes,
                f"Conv pads {pads or auto_pad} are non-zero: folding a BN into the following conv is not "
                "exact at the borders (the zero padding enters after the BN; NORMS.md §5)",
            )
            return False
        s, t = affine
        weight = conv.inputs[1]
        w = g.const_array(weight)
        if w is None or weight is None:
            self.skipped(nodes, g.nonconst_reason(weight, "Conv weight"))
            return False
        bias_value = conv.inputs[2] if len(conv.inputs) > 2 else None
        b = g.const_array(bias_value) if bias_value is not None else None
        if bias_value is not None and b is None:
            self.skipped(nodes, g.nonconst_reason(bias_value, "Conv bias"))
            return False
        shared = g.shared_weight_reason(weight, conv, self.ctx.allow_weight_copies)
        if shared:
            self.skipped(nodes, shared)
            return False
        group = g.attr_int(conv, "group", 1)
        if w.shape[1] * group != s.size or w.shape[0] % group:
            self.skipped(nodes, f"BN has {s.size} channels but the Conv reads {w.shape[1] * group}")
            return False
        w64, b64 = _math.fold_into_next_conv(w, b, s, t, group)
        dtypes = (w.dtype, b.dtype if b is not None else w.dtype)
        inits = _folded_initializers(self, graph, nodes, weight, bias_value, dtypes, w64, b64)
        if inits is None:
            return False
        new = g.clone_node(conv, [bn.inputs[0], *inits])
        g.stamp(new, conv, module_path(conv))
        g.swap(graph, [bn, conv], [new], conv.outputs[0], new.outputs[0])
        self.applied(nodes, "folded into the following Conv's input channels")
        return True


STANDALONE_CHOICE = (
    "kept as BatchNormalization: on ORT CPU it ran 1.4-3.0x faster than the equivalent Mul+Add "
    "(benchmarks/standalone_bn.py, 1 thread: 1x64x56x56 0.061 vs 0.109 ms, 8x64x56x56 0.40 vs 1.20 ms, "
    "32x512 0.023 vs 0.032 ms)"
)


@register_pass
class StandaloneBatchNorm(NormfoldPass):
    """A BN with no foldable neighbour: keep the cheapest exact form, and say so.

    The candidates are the BN itself and ``Mul(x, s) + t`` with ``s``, ``t`` from the module docstring.
    Measured side by side on ORT CPU (``benchmarks/standalone_bn.py``), the native BN kernel wins at
    every shape tried (one pass over memory instead of two), so this rule leaves the node alone and
    records the choice and the reason the BN stayed (training mode, run-time statistics, …).
    """

    name = "standalone_bn"

    def run(self, model: ir.Model) -> bool:
        for bn in _batchnorms(model.graph):
            affine = bn_affine(bn)
            reason = affine if isinstance(affine, str) else STANDALONE_CHOICE
            self.skipped((bn,), reason)
        return False
