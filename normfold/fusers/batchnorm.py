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

import abc
import functools
import itertools
import logging
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import onnx_ir as ir

from normfold.fusers import _graph as g
from normfold.fusers import _math
from normfold.fusers._facts import GraphFacts
from normfold.fusers._fold import FoldRule, FoldSite, fold_layer, weight_reason
from normfold.fusers.base import Reject, Rule, Scope, Site, register_rule

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
    gamma, beta, mean, var = params
    return _math.bn_scale_shift(gamma, beta, mean, var, eps)


@dataclass(frozen=True, eq=False)
class BnSite(FoldSite):
    """A BatchNormalization next to a layer: ``bn`` is folded into ``layer``."""

    bn: ir.Node

    @functools.cached_property
    def affine(self) -> tuple[np.ndarray, np.ndarray] | str:
        """:func:`bn_affine` of the BN, computed once per site."""
        return bn_affine(self.bn)

    def scale_shift(self) -> tuple[np.ndarray, np.ndarray]:
        """``(s, t)`` of a BN that ``check`` accepted."""
        assert not isinstance(self.affine, str), self.affine
        return self.affine


B = TypeVar("B", bound=BnSite)


class _BatchNormFold(FoldRule[B]):
    """A BN folded into a layer: the BN must be foldable (:func:`bn_affine`), then the layer is checked."""

    anchors = ("BatchNormalization",)

    def validate(self, site: B) -> str | None:
        affine = site.affine
        return affine if isinstance(affine, str) else self.validate_layer(site, affine[0].size)

    @abc.abstractmethod
    def validate_layer(self, site: B, channels: int) -> str | None:
        """Why the layer cannot absorb a ``channels``-channel BN, or None."""


def _inputs(layer: ir.Node) -> tuple[ir.Value | None, ir.Value | None]:
    """The layer's weight and optional bias input."""
    weight = layer.inputs[1] if len(layer.inputs) > 1 else None
    return weight, layer.inputs[2] if len(layer.inputs) > 2 else None


@register_rule
class FuseBatchNormIntoConv(_BatchNormFold[BnSite]):
    """``BN(Conv(x, W, B))`` → ``Conv(x, W', B')`` and the same for ConvTranspose.

    Conv weight ``(Cout, Cin/g, *k)``: ``W' = W·s[o]`` on axis 0. ConvTranspose weight
    ``(Cin, Cout/g, *k)``: output channel ``o = gi·Cout/g + j`` is column ``j`` of group ``gi``'s rows,
    so ``s`` is reshaped to ``(g, Cout/g)``. Both: ``B' = B·s + t`` (absent ``B`` = 0). Any rank
    (1d/2d/3d), dilation and strides are irrelevant to the algebra. The fused conv produces what the BN
    produced, so it carries the BN's module path.
    """

    name = "fuse_bn_into_conv"

    def match(self, facts: GraphFacts, node: ir.Node) -> BnSite | None:
        y = node.inputs[0]
        conv = y.producer() if y is not None else None
        if conv is None or conv.op_type not in ("Conv", "ConvTranspose") or conv.domain != "":
            return None
        weight, bias = _inputs(conv)
        return BnSite(nodes=(conv, node), anchor=node, layer=conv, weight=weight, bias=bias, bn=node)

    def validate_layer(self, site: BnSite, channels: int) -> str | None:
        conv, bn = site.layer, site.bn
        y = bn.inputs[0]
        if y is None or g.sole_consumer(y) is not bn:
            return f"{conv.op_type} output '{y.name if y else ''}' has other consumers besides the BN"
        reason = weight_reason(site, self.ctx.allow_weight_copies)
        if reason is not None:
            return reason
        w, _ = site.arrays()
        group = g.attr_int(conv, "group", 1)
        cout = w.shape[0] if conv.op_type == "Conv" else w.shape[1] * group
        if cout != channels or (conv.op_type == "ConvTranspose" and w.shape[0] % group):
            return f"BN has {channels} channels but the {conv.op_type} produces {cout}"
        return None

    def fold(self, site: BnSite) -> tuple[np.ndarray, np.ndarray]:
        s, t = site.scale_shift()
        w, b = site.arrays()
        if site.layer.op_type == "Conv":
            w64 = _math.scale_output_channels(w, s, 0)
        else:
            w64 = _math.scale_conv_transpose(w, s, g.attr_int(site.layer, "group", 1))
        return w64, _math.fold_bias(b, s, t)

    def rewrite(self, scope: Scope, site: BnSite) -> list[ir.Node]:
        conv, bn = site.layer, site.bn
        new = fold_layer(scope, site, conv.inputs[0], self.folded_weights(site), source=bn, add_name="")
        g.swap(scope.graph, [conv, bn], new, bn.outputs[0], new[-1].outputs[0])
        return new


@dataclass(frozen=True, eq=False)
class GemmSite(BnSite):
    """``bn`` after a Gemm/MatMul ``layer``; ``chain`` the optional bias Add and Transpose between them."""

    chain: tuple[ir.Node, ...]

    def link(self, op_type: str) -> ir.Node | None:
        return next((c for c in self.chain if c.op_type == op_type), None)


def _feature_layer(y: ir.Value) -> tuple[list[ir.Node], ir.Node | None]:
    """Walk up from the BN input: optional Transpose or Reshape, optional Add(bias), then Gemm or MatMul.

    Returns ``(chain, layer)``: ``chain`` the nodes between the layer's output and the BN (layer side
    first), ``layer`` the Gemm/MatMul, or None when this BN is no candidate for this rule.
    """
    chain: list[ir.Node] = []
    node = y.producer()
    if node is not None and node.op_type in ("Transpose", "Reshape") and node.domain == "":
        chain.insert(0, node)
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
    if node is not None and node.op_type == "Add" and node.domain == "":
        producers = [v.producer() for v in node.inputs if v is not None]
        mm = [p for p in producers if p is not None and p.op_type == "MatMul" and p.domain == ""]
        if not mm:
            return chain, None
        chain.insert(0, node)
        node = mm[0]
    if node is None or node.op_type not in ("Gemm", "MatMul") or node.domain != "":
        return chain, None
    if node.op_type == "Gemm" and any(c.op_type == "Add" for c in chain):
        return chain, None
    return chain, node


@register_rule
class FuseBatchNormIntoGemm(_BatchNormFold[GemmSite]):
    """``BN(Gemm)``, ``BN(MatMul(+Add))``, ``BN(Transpose(MatMul+Add))`` (Linear→BatchNorm1d) and
    ``BN(Reshape(MatMul(+Add)))`` (timm LeViT's ``bn(linear(x).flatten(0, 1)).reshape_as(x)``).

    The feature axis of ``Y = α·A·B + β·C`` is N: ``B`` is ``(K, N)`` for transB=0 (scale axis 1) and
    ``(N, K)`` for transB=1 (axis 0). ``s·Y + t = α·A·(B·s) + (β·C·s + t)``, so ``B' = B·s``,
    ``C' = β·C·s + t`` and β becomes 1. For ``MatMul(A, W(K, N)) (+ b)``: ``W' = W·s`` on axis 1,
    ``b' = b·s + t`` (a new Add when there was none).

    BN normalizes axis 1. That is the layer's feature (last) axis only for a rank-2 output, or when a
    Transpose in between moves the last axis to position 1 (Linear on (N, L, C) → transpose → BN1d on
    (N, C, L)), or when a Reshape in between gives a rank-2 (M, C) whose last dim C is the layer
    output's last dim: a row-major reshape that keeps the size of the last axis maps element
    (…, c) to (m, c) (flat index mod C = c), so every element keeps its channel. Otherwise the BN
    scales along rows the weights do not have, and it is skipped with that reason (the standalone rule
    then keeps it).
    """

    name = "fuse_bn_into_gemm"

    def match(self, facts: GraphFacts, node: ir.Node) -> GemmSite | None:
        y = node.inputs[0]
        if y is None:
            return None
        chain, layer = _feature_layer(y)
        if layer is None:
            return None
        add = next((c for c in chain if c.op_type == "Add"), None)
        if layer.op_type == "Gemm":
            bias = layer.inputs[2] if len(layer.inputs) > 2 else None
        else:
            bias = next((v for v in add.inputs if v is not layer.outputs[0]), None) if add else None
        weight = layer.inputs[1]
        nodes = (layer, *chain, node)
        return GemmSite(nodes=nodes, anchor=node, layer=layer, weight=weight, bias=bias, bn=node, chain=tuple(chain))

    def validate_layer(self, site: GemmSite, channels: int) -> str | None:
        # every intermediate value must feed exactly the next node of the chain
        for producer, consumer in itertools.pairwise(site.nodes):
            if g.sole_consumer(producer.outputs[0]) is not consumer:
                return f"'{producer.outputs[0].name}' has other consumers besides the BN chain"
        reason = _feature_axis_reason(site) or weight_reason(site, self.ctx.allow_weight_copies)
        if reason is not None:
            return reason
        w, b = site.arrays()
        layer = site.layer
        if w.ndim != 2:
            return f"{layer.op_type} weight has rank {w.ndim}, expected 2"
        if w.shape[_gemm_axis(layer)] != channels:
            return f"BN has {channels} channels but the {layer.op_type} produces {w.shape[_gemm_axis(layer)]}"
        if b is not None and site.link("Add") is not None and not _is_feature_bias(b, channels):
            return f"Add operand of shape {list(b.shape)} is not a per-feature bias"
        return None

    def fold(self, site: GemmSite) -> tuple[np.ndarray, np.ndarray]:
        s, t = site.scale_shift()
        w, b = site.arrays()
        beta = g.attr_float(site.layer, "beta", 1.0) if site.layer.op_type == "Gemm" else 1.0
        w64 = _math.scale_output_channels(w, s, _gemm_axis(site.layer))
        return w64, _math.fold_bias(None if b is None else beta * np.asarray(b, dtype=np.float64), s, t)

    def rewrite(self, scope: Scope, site: GemmSite) -> list[ir.Node]:
        layer, bn, add = site.layer, site.bn, site.link("Add")
        transpose = site.link("Transpose") or site.link("Reshape")
        add_name = add.name if add is not None and add.name else f"{bn.name}_bias"
        new = fold_layer(scope, site, layer.inputs[0], self.folded_weights(site), source=bn, add_name=add_name)
        out = new[-1].outputs[0]
        old = [layer, *([add] if add else [])]
        if transpose is None:
            g.swap(scope.graph, [*old, bn], new, bn.outputs[0], out)
            return new
        # keep the Transpose: it now reads the folded layer and produces what the BN produced
        scope.graph.insert_before(layer, new)
        out.type, out.shape = old[-1].outputs[0].type, old[-1].outputs[0].shape
        transpose.replace_input_with(0, out)  # (or the Reshape: it keeps the channel axis)
        scope.graph.remove(old, safe=True)
        _route(scope.graph, bn, transpose.outputs[0])
        return new


def _gemm_axis(layer: ir.Node) -> int:
    """The weight axis of the output features: Gemm ``B`` is (N, K) with transB=1, else (K, N)."""
    return 0 if layer.op_type == "Gemm" and g.attr_int(layer, "transB", 0) else 1


def _feature_axis_reason(site: GemmSite) -> str | None:
    """Why BN's axis 1 is not the layer's feature axis (see :class:`FuseBatchNormIntoGemm`)."""
    transpose, layer = site.link("Transpose"), site.layer
    reshape = site.link("Reshape")
    if reshape is not None:
        return _reshape_channel_reason(reshape)
    if transpose is not None:
        perm = g.attr_ints(transpose, "perm")
        if perm is None or len(perm) < 2 or perm[1] != len(perm) - 1:
            return f"Transpose perm {perm} does not move the layer's feature axis to the BN axis 1"
        return None
    rank = 2 if layer.op_type == "Gemm" else _rank(layer, site.bn.inputs[0])
    if rank != 2:
        return (
            f"BN normalizes axis 1 of a rank-{rank} {layer.op_type} output, not the layer's feature "
            "(last) axis: the scale cannot move into the weights"
        )
    return None


def _reshape_channel_reason(reshape: ir.Node) -> str | None:
    """None when ``reshape`` maps the layer output (…, C) to (M, C), keeping each element's channel."""
    src, dst = reshape.inputs[0], reshape.outputs[0]
    before = src.shape if src is not None else None
    after = dst.shape
    if before is None or after is None:
        return "cannot prove the Reshape between the layer and the BN keeps the channel axis (shapes unknown)"
    c_in, c_out = before[len(before) - 1], after[len(after) - 1] if len(after) else None
    if len(after) != 2 or not isinstance(c_in, int) or c_in != c_out:
        return (
            f"the Reshape {list(before)} → {list(after)} does not keep the layer's channel (last) axis as "
            "the BN axis 1: the scale cannot move into the weights"
        )
    return None


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


def _rank(layer: ir.Node, y: ir.Value | None) -> int | None:
    for value in (y, layer.outputs[0], layer.inputs[0]):
        if value is not None and value.shape is not None:
            return len(value.shape)
    return None


@register_rule
class FuseBatchNormIntoNextConv(_BatchNormFold[BnSite]):
    """``Conv(BN(x), W, B)`` → ``Conv(x, W', B')`` when the conv has no padding.

    With ``k = Cin/g`` input channels per group and ``gi = o // (Cout/g)``:
    ``W'[o, j] = W[o, j]·s[gi·k + j]`` and ``B'[o] = B[o] + Σ_{j,spatial} W[o, j]·t[gi·k + j]``.
    Exact only when every pad is zero (auto_pad NOTSET or VALID): the original pads the *normalized*
    tensor with zeros, the folded conv would pad the raw one, which differs by ``t`` at the borders
    (NORMS.md §5 measured a max error of 2.8 on outputs of magnitude 5.3). The new conv still produces
    the conv module's output, so it keeps the conv's module path.
    """

    name = "fuse_bn_into_next_conv"

    def match(self, facts: GraphFacts, node: ir.Node) -> BnSite | None:
        convs = [u.node for u in node.outputs[0].uses() if u.node.op_type == "Conv" and u.node.domain == ""]
        if not convs:
            return None
        weight, bias = _inputs(convs[0])
        return BnSite(nodes=(node, convs[0]), anchor=node, layer=convs[0], weight=weight, bias=bias, bn=node)

    def validate_layer(self, site: BnSite, channels: int) -> str | None:
        conv, bn = site.layer, site.bn
        out = bn.outputs[0]
        if g.sole_consumer(out) is not conv or conv.inputs[0] is not out:
            return f"BN output '{out.name}' has other consumers besides the Conv input"
        pads = g.attr_ints(conv, "pads") or []
        auto_pad = g.attr_str(conv, "auto_pad", "NOTSET")
        if any(pads) or auto_pad not in ("NOTSET", "VALID"):
            return (
                f"Conv pads {pads or auto_pad} are non-zero: folding a BN into the following conv is not "
                "exact at the borders (the zero padding enters after the BN; NORMS.md §5)"
            )
        reason = weight_reason(site, self.ctx.allow_weight_copies)
        if reason is not None:
            return reason
        w, _ = site.arrays()
        group = g.attr_int(conv, "group", 1)
        if w.shape[1] * group != channels or w.shape[0] % group:
            return f"BN has {channels} channels but the Conv reads {w.shape[1] * group}"
        return None

    def fold(self, site: BnSite) -> tuple[np.ndarray, np.ndarray]:
        s, t = site.scale_shift()
        w, b = site.arrays()
        return _math.fold_into_next_conv(w, b, s, t, g.attr_int(site.layer, "group", 1))

    def rewrite(self, scope: Scope, site: BnSite) -> list[ir.Node]:
        conv, bn = site.layer, site.bn
        new = fold_layer(scope, site, bn.inputs[0], self.folded_weights(site), source=conv, add_name="")
        g.swap(scope.graph, [bn, conv], new, conv.outputs[0], new[-1].outputs[0])
        return new

    def describe(self, site: BnSite, created: list[ir.Node]) -> str:
        return "folded into the following Conv's input channels"


STANDALONE_CHOICE = (
    "kept as BatchNormalization: on ORT CPU it ran 1.4-3.0x faster than the equivalent Mul+Add "
    "(benchmarks/standalone_bn.py, 1 thread: 1x64x56x56 0.061 vs 0.109 ms, 8x64x56x56 0.40 vs 1.20 ms, "
    "32x512 0.023 vs 0.032 ms)"
)


@register_rule
class StandaloneBatchNorm(Rule[Site]):
    """A BN with no foldable neighbour: keep the cheapest exact form, and say so.

    The candidates are the BN itself and ``Mul(x, s) + t`` with ``s``, ``t`` from the module docstring.
    Measured side by side on ORT CPU (``benchmarks/standalone_bn.py``), the native BN kernel wins at
    every shape tried (one pass over memory instead of two), so this rule leaves the node alone and
    records the choice and the reason the BN stayed (training mode, run-time statistics, …).
    """

    name = "standalone_bn"
    anchors = ("BatchNormalization",)

    def match(self, facts: GraphFacts, node: ir.Node) -> Reject:
        affine = bn_affine(node)
        return Reject((node,), affine if isinstance(affine, str) else STANDALONE_CHOICE)

    def rewrite(self, scope: Scope, site: Site) -> list[ir.Node]:
        raise AssertionError("standalone_bn only reports: match() never returns a site")
