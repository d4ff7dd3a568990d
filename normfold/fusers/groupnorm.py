"""Fuse emulated and hand-written GroupNorm into ``GroupNormalization``-21 (per-channel scale/bias).

Algebra: for x of shape (N, C, *S) and G groups with C % G == 0, the row-major view
``v = Reshape(x, [N, G, -1])`` puts channels ``g·C/G … (g+1)·C/G − 1`` of one sample in row ``(n, g)``, so

    u = Reshape((v − mean(v, 2)) / sqrt(var(v, 2) + ε), shape(x))      (population variance)
    y = u · γ[c] + β[c]  ≡  GroupNormalization-21(x, γ, β, num_groups=G, epsilon=ε)

Two sources match:

1. the exporters' emulation below opset 21 (torch legacy and dynamo ≤ 20, NORMS.md §2):
   ``Reshape → InstanceNormalization(s_g, b_g) → Reshape → Mul(γ) → Add(β)``. InstanceNormalization on
   (N, G, L) normalizes each (n, g) row over L; its per-group affine folds into the channel affine:
   ``γ'[c] = γ[c]·s_g[g(c)]``, ``β'[c] = γ[c]·b_g[g(c)] + β[c]`` with ``g(c) = c // (C/G)`` (computed in
   float64, then cast to x's dtype);
2. the hand-written ``x.view(N, G, -1)``, mean, ``var(unbiased=False)``, ``(x−μ)/sqrt(var+ε)``, view
   back, ``·w[None, :, None, None] + b[...]`` (the core matcher of :mod:`normfold.fusers._normcore`).

γ/β are absorbed only when they are constants that vary over the channel axis alone; otherwise the
GroupNormalization gets ones/zeros and the Mul/Add stay. GroupNormalization-18 is never emitted (its
scale is per group, it is deprecated, and onnx's C++ converter turns it into opset 21 silently wrong,
NORMS.md §1). The fusion needs opset ≥ 21: a lower model is raised only when ``ctx.target_opset`` ≥ 21
asks for it and :func:`normfold.fusers._opset.opset_raise_blocker` finds no op whose meaning changes;
otherwise the pattern is left as it is and each site is skipped with the reason.

Why not onnxscript's ``ort_fusions/instance_to_group_normalization.py``: it emits
``com.microsoft.GroupNorm`` in NHWC, which has no CPU kernel (NORMS.md §3), and needs rank 4 and static
shapes; there is no onnxscript rule for the hand-written form.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from normfold.fusers._facts import GraphFacts
from normfold.fusers._graph import (
    other_operand,
    per_channel,
    single_consumer,
    swap_chain,
)
from normfold.fusers._normcore import NormCore, match_core
from normfold.fusers.base import Reject, Rule, Scope, Site, register_rule

logger = logging.getLogger(__name__)

GROUPNORM_OPSET = 21
_GN_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


@dataclass(frozen=True, eq=False)
class GroupNormSite(Site):
    """What to emit for one GroupNorm site: ``norm`` is the InstanceNormalization or the mean's
    ReduceMean (its module path goes to the fused node); γ/β are per-channel, in x's dtype."""

    x: ir.Value
    groups: int
    eps: float
    dtype: ir.DataType
    scale: np.ndarray
    bias: np.ndarray
    output: ir.Value
    norm: ir.Node
    affine: str = "none"


@register_rule
class GroupNormFusion(Rule[GroupNormSite]):
    """Reshape→(InstanceNormalization | hand-written mean/var)→Reshape[→Mul(γ)][→Add(β)] → GN-21."""

    name = "fuse_groupnorm"
    anchors = ("InstanceNormalization", "ReduceMean", "ReduceSum")
    opset = (GROUPNORM_OPSET, "GroupNormalization-21")
    prime_facts = True

    def match(self, facts: GraphFacts, node: ir.Node) -> GroupNormSite | Reject | None:
        if node.op_type == "InstanceNormalization":
            return self._match_instance_norm(facts, node)
        return self._match_handwritten(facts, node)

    # -- matching -------------------------------------------------------------------------------
    def _match_instance_norm(self, facts: GraphFacts, node: ir.Node) -> GroupNormSite | Reject | None:
        xg = node.inputs[0]
        reshape = xg.producer() if xg is not None else None
        if reshape is None or reshape.op_type != "Reshape":
            return None  # a real InstanceNorm, not a GroupNorm emulation
        site = (reshape, node)
        groups = _group_layout(facts, reshape)
        if isinstance(groups, str):
            return Reject(site, groups)
        x, g, _ = groups  # InstanceNormalization normalizes every axis after 1, whatever the view's rank
        s_g = facts.const(node.inputs[1])
        b_g = facts.const(node.inputs[2])
        if s_g is None or b_g is None:
            return Reject(site, "InstanceNormalization scale/bias are not constant")
        if s_g.size != g or b_g.size != g:
            return Reject(site, f"InstanceNormalization has {s_g.size} channels, the reshape makes {g} groups")
        eps_attr = node.attributes.get("epsilon")
        eps = eps_attr.as_float() if eps_attr is not None else 1e-5
        return self._finish(facts, x, g, eps, node, [reshape, node], s_g.reshape(-1), b_g.reshape(-1))

    def _match_handwritten(self, facts: GraphFacts, node: ir.Node) -> GroupNormSite | Reject | None:
        xg = node.inputs[0]
        reshape = xg.producer() if xg is not None else None
        if reshape is None or reshape.op_type != "Reshape":
            return None
        core = match_core(facts, node)
        if core is None:
            return None
        if isinstance(core, Reject):
            return None if isinstance(_group_layout(facts, reshape), str) else core
        if single_consumer(core.output, "Reshape") is None:
            return None  # not viewed back: a LayerNorm-like site on a reshaped tensor, not a GroupNorm
        nodes = (reshape, *core.nodes)
        groups = _group_layout(facts, reshape)
        if isinstance(groups, str):
            return Reject(nodes, groups)
        x, g, view_rank = groups
        if core.axes not in ((-1,), tuple(range(2, view_rank))) or (core.axes == (-1,) and view_rank != 3):
            return Reject(
                nodes,
                f"normalizes over axes {list(core.axes)} of the rank-{view_rank} grouped view; GroupNorm "
                f"normalizes every axis after the group axis ({list(range(2, view_rank))})",
            )
        return self._finish(facts, x, g, core.eps, node, [reshape, *core.nodes], None, None, core)

    def _finish(
        self,
        facts: GraphFacts,
        x: ir.Value,
        groups: int,
        eps: float,
        anchor: ir.Node,
        nodes: list[ir.Node],
        s_g: np.ndarray | None,
        b_g: np.ndarray | None,
        core: NormCore | None = None,
    ) -> GroupNormSite | Reject:
        inner = core.output if core is not None else anchor.outputs[0]
        site = tuple(nodes)
        back = single_consumer(inner, "Reshape")
        if back is None:
            return Reject(site, "the normalized groups are not reshaped back to the input shape")
        restore = _restores_shape(facts, back, x)
        if restore is not None:
            return Reject((*site, back), restore)
        nodes = [*nodes, back]
        dtype = facts.dtype(x)
        if dtype not in _GN_TYPES:
            return Reject(tuple(nodes), f"input dtype {dtype} is not supported by GroupNormalization-21")
        shape = facts.shape(x)
        assert shape is not None and shape[1] is not None
        channels = int(shape[1])
        per = channels // groups
        gamma = np.ones(channels) if s_g is None else np.repeat(s_g.astype(np.float64), per)
        beta = np.zeros(channels) if b_g is None else np.repeat(b_g.astype(np.float64), per)
        current = back.outputs[0]
        affine = "none"
        mul = single_consumer(current, "Mul")
        w = _per_channel(facts, other_operand(mul, current), len(shape), channels) if mul else None
        if mul is not None and w is not None:
            gamma, beta = gamma * w, beta * w
            nodes.append(mul)
            current = mul.outputs[0]
            affine = "scale"
        add = single_consumer(current, "Add")
        b = _per_channel(facts, other_operand(add, current), len(shape), channels) if add else None
        if add is not None and b is not None:
            beta = beta + b
            nodes.append(add)
            current = add.outputs[0]
            affine += "+bias"
        np_dtype = dtype.numpy()
        return GroupNormSite(
            nodes=tuple(nodes),
            anchor=nodes[0],
            norm=anchor,
            x=x,
            groups=groups,
            eps=eps,
            dtype=dtype,
            scale=gamma.astype(np_dtype),
            bias=beta.astype(np_dtype),
            output=current,
            affine=affine,
        )

    # -- rewriting ------------------------------------------------------------------------------
    def rewrite(self, scope: Scope, site: GroupNormSite) -> list[ir.Node]:
        base = site.output.name or "groupnorm"
        scale = scope.constant(site.scale, f"{base}_gn_scale")
        bias = scope.constant(site.bias, f"{base}_gn_bias")
        gn = ir.node(
            "GroupNormalization",
            [site.x, scale, bias],
            attributes={"num_groups": site.groups, "epsilon": float(site.eps), "stash_type": 1},
            name=scope.names.fresh(f"{site.norm.name or 'GroupNorm'}_GroupNormalization"),
        )
        swap_chain(
            scope.graph, scope.names, site.nodes, gn, site.output, owner=site.norm, dtype=site.dtype, base=f"{base}_gn"
        )
        return [gn]

    def describe(self, site: GroupNormSite, created: list[ir.Node]) -> str:
        return (
            f"GroupNormalization-21(num_groups={site.groups}, epsilon={site.eps:g}, stash_type=1, affine={site.affine})"
        )


def _group_layout(facts: GraphFacts, reshape: ir.Node) -> tuple[ir.Value, int, int] | str:
    """(x, G, rank of the view) when ``reshape`` views x (N, C, *S) as (N, G, *R) with ΠR = C/G·ΠS
    (``x.view(N, G, -1)`` or ``x.view(N, G, C // G, H, W)``); else why it does not. Row (n, g) of such a
    view holds exactly the elements of channel group g (row-major order), whatever R is."""
    x = reshape.inputs[0]
    shape = facts.shape(x)
    if x is None or shape is None or len(shape) < 2:
        return "the grouped reshape's input rank is unknown"
    channels = shape[1]
    if channels is None:
        return "the channel count C is not static"
    spatial = shape[2:]
    inner = int(np.prod([d for d in spatial if d is not None])) if all(d is not None for d in spatial) else None
    target = facts.const(reshape.inputs[1])
    allowzero = reshape.attributes.get("allowzero")
    if target is not None:
        dims = [int(t) for t in target.reshape(-1)]
        if len(dims) < 3:
            return f"reshape to {dims} is not a (N, G, ...) group view"
        if dims[0] == 0 and not (allowzero is not None and allowzero.as_int()):
            dims[0] = shape[0] if shape[0] is not None else -2  # copied batch dim
        elif dims[0] != shape[0]:
            return f"reshape to {dims} does not keep the batch axis of a {list(shape)} input"
        groups, tail = dims[1], dims[2:]
        if any(t == 0 or t < -1 for t in tail) or (groups == -1 and -1 in tail):
            return f"reshape to {dims} does not put channel groups on axis 1"
        rest = int(np.prod(tail)) if -1 not in tail else -1
        if groups == -1 and inner is not None and (channels * inner) % rest == 0:
            groups = channels * inner // rest  # x.view(N, -1, L): the row count is implied
        if groups <= 0:
            return f"reshape to {dims} does not put channel groups on axis 1"
        if rest != -1 and (inner is None or groups * rest != channels * inner):
            return f"reshape to {dims} does not match the group layout of a {list(shape)} input"
        view_rank = len(dims)
    else:
        # A run-time target (x.view(x.shape[0], G, -1) with a dynamic batch): with the batch dim provably
        # kept and G rows, each row holds C/G·ΠS elements because Reshape preserves the element count.
        out = facts.sym_shape(reshape.outputs[0])
        batch = (facts.sym_shape(x) or (None,))[0]
        if out is None or len(out) < 3 or not isinstance(out[1], int):
            return "the grouped reshape's target is not constant and its output shape is unknown"
        if batch is None or out[0] != batch:
            return f"cannot prove the reshape to {list(out)} keeps the batch axis of a {list(shape)} input"
        groups = int(out[1])
        if all(isinstance(d, int) for d in out[2:]):
            rest = int(np.prod([int(d) for d in out[2:]]))  # type: ignore[arg-type]
            if inner is None or groups * rest != channels * inner:
                return f"reshape to {list(out)} does not match the group layout of a {list(shape)} input"
        view_rank = len(out)
    if channels % groups:
        return f"group count {groups} does not divide C={channels}: the reshape does not follow channel groups"
    return x, groups, view_rank


def _restores_shape(facts: GraphFacts, back: ir.Node, x: ir.Value) -> str | None:
    """None when ``back`` reshapes the groups back to x's shape; else why not."""
    target = back.inputs[1]
    producer = target.producer() if target is not None else None
    if producer is not None and producer.op_type == "Shape" and producer.inputs[0] is x:
        start = producer.attributes.get("start")
        if producer.attributes.get("end") is None and (start is None or start.as_int() == 0):
            return None
    want = facts.static_shape(x)
    dims = facts.const(target)
    if dims is None or want is None:
        got, sym_want = facts.sym_shape(back.outputs[0]), facts.sym_shape(x)
        if got is not None and got == sym_want and all(d is not None for d in got):
            return None  # equal dims or equal symbols: the same shape at run time
        return f"cannot prove the reshape back ({got}) restores the input shape {sym_want}"
    resolved = [int(d) for d in dims.reshape(-1)]
    src = facts.shape(back.inputs[0]) or ()
    for i, d in enumerate(resolved):
        if d == 0 and i < len(src) and src[i] is not None:
            resolved[i] = int(src[i])  # type: ignore[arg-type]
    if -1 in resolved and resolved.count(-1) == 1:
        known = int(np.prod([d for d in resolved if d != -1]))
        resolved[resolved.index(-1)] = int(np.prod(want)) // known if known else -1
    if tuple(resolved) != want:
        return f"reshape back to {resolved} does not restore the input shape {list(want)}"
    return None


def _per_channel(facts: GraphFacts, value: ir.Value | None, rank: int, channels: int) -> np.ndarray | None:
    """The constant as a float64 (C,) vector when it broadcasts over the channel axis (1) only."""
    array = facts.const(value)
    return None if array is None else per_channel(array, rank, 1, channels)
