"""Fuse hand-written RMSNorm (Llama style) into ONNX ``RMSNormalization`` (opset 23, stash_type=1).

Algebra: with the normalized axes ``A = [axis, rank)`` and ``n = Π shape[A]``,

    r = ReduceMean(x², A)                                   (mean square: no mean is subtracted)
    y = x · 1/sqrt(r + ε) · γ  ≡  RMSNormalization(x, γ, axis, epsilon=ε)

which holds when γ broadcasts only over the normalized dims. The square is ``Pow(x, 2)`` or ``Mul(x, x)``;
the mean ``ReduceMean`` or ``ReduceSum``/n (:func:`normfold.fusers._normcore.mean_of`); the division
``Div(x, Sqrt(r + ε))``, ``Mul(x, Reciprocal(Sqrt(·)))``, ``Mul(x, Div(1, Sqrt(·)))`` (``torch.rsqrt``)
or ``Mul(x, Pow(r + ε, -0.5))``; a same-type ``Cast`` before γ (HF's ``.to(input_dtype)`` in float32) is
an identity and goes with the site. It is never matched as a LayerNorm: that needs ``x − mean(x)``.

Look-alikes are refused with the reason: eps added to the RMS instead of the mean square, reduction over
axes that are not the trailing ones, a non-constant eps, intermediates used elsewhere.

Per target (the rule's ``check``): on ``ort-cpu`` the chain is kept, because ORT fuses it into its own
``SimplifiedLayerNormalization`` kernel (measured equal to RMSNormalization-23 at 1×128×768, README).
Elsewhere it is fused where the model's opset is ≥ 23; a lower model is raised only when
``ctx.target_opset`` ≥ 23 asks for it (never silently), otherwise each site is skipped with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from normfold.fusers._facts import GraphFacts
from normfold.fusers._graph import (
    other_operand,
    producer_op,
    swap_chain,
    value_uses,
)
from normfold.fusers._normcore import Mean, anchor_mean, leak_reason, mean_of
from normfold.fusers.base import Reject, Rule, Scope, Site, register_rule
from normfold.fusers.layernorm import affine_param

logger = logging.getLogger(__name__)

RMSNORM_OPSET = 23
_RMS_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
KEPT_ON_ORT_CPU = (
    "kept on ort-cpu: ORT's CPU EP fuses this chain into its SimplifiedLayerNormalization kernel itself "
    "(measured equal to RMSNormalization-23 at 1x128x768), so a rewrite gains nothing"
)


@dataclass(frozen=True, eq=False)
class RMSNormSite(Site):
    """A matched RMSNorm: its input, axis, eps, γ (array of the normalized shape, a value, or None) and
    the value the fused node replaces."""

    x: ir.Value
    axis: int
    eps: float
    dtype: ir.DataType
    norm_shape: tuple[int | None, ...]
    scale: np.ndarray | ir.Value | None
    output: ir.Value


@register_rule
class RMSNormFusion(Rule[RMSNormSite]):
    """(Pow|Mul)-(ReduceMean|ReduceSum/n)-Add(ε)-(Sqrt-(Div|Reciprocal·Mul) | Pow(-0.5)·Mul)[-Mul(γ)] → RMS-23."""

    name = "fuse_rmsnorm"
    anchors = ("ReduceMean", "ReduceSum")
    opset = (RMSNORM_OPSET, "RMSNormalization-23")
    prime_facts = True

    def match(self, facts: GraphFacts, node: ir.Node) -> RMSNormSite | Reject | None:
        mean = anchor_mean(node)
        parsed = mean_of(facts, mean) if mean is not None else None
        if not isinstance(parsed, Mean) or mean is None:
            return None
        x = _squared(facts, parsed.x)
        if x is None or _is_deviation(facts, x):
            return None  # the variance of a LayerNorm/GroupNorm core: the LayerNorm fuser's business
        found = _normalized(facts, mean, x)
        if found is None:
            return None
        if isinstance(found, Reject):
            return Reject((*parsed.nodes, *found.nodes), found.reason)
        nodes, eps, output = found
        square = parsed.x.producer()
        nodes = [square, *parsed.nodes, *nodes]  # type: ignore[list-item]
        rank, dtype, shape = facts.rank(x), facts.dtype(x), facts.shape(x)
        k = len(parsed.axes)
        if rank is None or shape is None or k == 0 or parsed.axes != tuple(range(rank - k, rank)):
            return Reject(tuple(nodes), f"mean square over axes {list(parsed.axes)} is not over trailing axes")
        if dtype not in _RMS_TYPES:
            return Reject(tuple(nodes), f"input dtype {dtype} is not supported by RMSNormalization")
        leak = leak_reason(nodes, output, x)
        if leak is not None:
            return Reject(tuple(nodes), leak)
        norm_shape = shape[rank - k :]
        scale, output = _absorb_scale(facts, output, rank, norm_shape, dtype, nodes)
        if scale is None and any(d is None for d in norm_shape):
            return Reject(tuple(nodes), f"normalized dims {norm_shape} are not static: cannot build a ones scale")
        return RMSNormSite(
            nodes=tuple(nodes),
            anchor=node,
            x=x,
            axis=rank - k,
            eps=eps,
            dtype=dtype,
            norm_shape=norm_shape,
            scale=scale,
            output=output,
        )

    def check(self, site: RMSNormSite) -> Reject | None:
        return Reject(site.nodes, KEPT_ON_ORT_CPU) if self.ctx.target == "ort-cpu" else None

    def rewrite(self, scope: Scope, site: RMSNormSite) -> list[ir.Node]:
        base = site.output.name or "rmsnorm"
        scale = site.scale
        if scale is None:
            scale = np.ones(tuple(int(d) for d in site.norm_shape if d is not None), dtype=site.dtype.numpy())
        scale_value = scope.constant(scale, f"{base}_rms_scale") if isinstance(scale, np.ndarray) else scale
        rms = ir.node(
            "RMSNormalization",
            [site.x, scale_value],
            attributes={"axis": site.axis, "epsilon": float(site.eps), "stash_type": 1},
            name=scope.names.fresh(f"{site.anchor.name or 'ReduceMean'}_RMSNormalization"),
        )
        swap_chain(
            scope.graph,
            scope.names,
            site.nodes,
            rms,
            site.output,
            owner=site.anchor,
            dtype=site.dtype,
            base=f"{base}_rms",
        )
        return [rms]

    def describe(self, site: RMSNormSite, created: list[ir.Node]) -> str:
        affine = "scale" if site.scale is not None else "none"
        return f"RMSNormalization-23(axis={site.axis}, epsilon={site.eps:g}, stash_type=1, affine={affine})"


def _squared(facts: GraphFacts, value: ir.Value) -> ir.Value | None:
    """x when ``value`` is ``Pow(x, 2)`` or ``Mul(x, x)``."""
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "Mul" and node.inputs[0] is node.inputs[1]:
        return node.inputs[0]
    if node.op_type == "Pow" and facts.scalar(node.inputs[1]) == 2.0:
        return node.inputs[0]
    return None


def _is_deviation(facts: GraphFacts, x: ir.Value) -> bool:
    """``x = Sub(t, mean(t))``: then mean(x²) is a variance and the chain a LayerNorm core, not an RMSNorm."""
    sub = x.producer()
    if sub is None or sub.op_type != "Sub":
        return False
    mean = mean_of(facts, sub.inputs[1])
    return isinstance(mean, Mean) and mean.x is sub.inputs[0]


def _only_user(value: ir.Value) -> ir.Node | None:
    uses = value_uses(value)
    return uses[0].node if len(uses) == 1 and not value.is_graph_output() else None


def _normalized(
    facts: GraphFacts, mean: ir.Value, x: ir.Value
) -> tuple[list[ir.Node], float, ir.Value] | Reject | None:
    """(nodes, ε, output) of ``x / sqrt(mean + ε)`` after the mean square; a Reject for eps on the RMS."""
    nodes: list[ir.Node] = []
    eps, ve = 0.0, mean
    user = _only_user(mean)
    if user is not None and user.op_type == "Add":
        c = facts.scalar(other_operand(user, mean))
        if c is None:
            return Reject((user,), "epsilon is not one constant scalar")
        eps, ve = float(c), user.outputs[0]
        nodes.append(user)
        user = _only_user(ve)
    if user is None:
        return None
    nodes.append(user)
    if user.op_type == "Pow" and facts.scalar(user.inputs[1]) == -0.5:
        return _times_x(nodes, user.outputs[0], x, eps)
    if user.op_type != "Sqrt":
        return None
    rms = user.outputs[0]
    after = _only_user(rms)
    if after is None:
        return None
    if after.op_type == "Add" and facts.scalar(other_operand(after, rms)) is not None:
        return Reject((*nodes, after), "eps is added to the RMS, not to the mean square: x/(rms+ε) is not an RMSNorm")
    if after.op_type == "Div" and after.inputs[1] is rms and after.inputs[0] is x:
        return [*nodes, after], eps, after.outputs[0]
    if after.op_type == "Reciprocal" or (after.op_type == "Div" and facts.scalar(after.inputs[0]) == 1.0):
        return _times_x([*nodes, after], after.outputs[0], x, eps)
    return None


def _times_x(
    nodes: list[ir.Node], inv: ir.Value, x: ir.Value, eps: float
) -> tuple[list[ir.Node], float, ir.Value] | None:
    """``Mul(x, inv)`` closing the chain (``inv`` = 1/sqrt(mean + ε))."""
    user = _only_user(inv)
    if user is None or user.op_type != "Mul" or other_operand(user, inv) is not x:
        return None
    return [*nodes, user], eps, user.outputs[0]


def _absorb_scale(
    facts: GraphFacts,
    output: ir.Value,
    rank: int,
    norm_shape: tuple[int | None, ...],
    dtype: ir.DataType,
    nodes: list[ir.Node],
) -> tuple[np.ndarray | ir.Value | None, ir.Value]:
    """γ of a following ``Mul`` (through a same-type Cast) and the new output; appends absorbed nodes."""
    current, extra = output, list[ir.Node]()
    user = _only_user(current)
    to = user.attributes.get("to") if user is not None and user.op_type == "Cast" else None
    if user is not None and to is not None and to.as_int() == dtype.value:
        extra.append(user)  # a same-type Cast is an identity
        current = user.outputs[0]
        user = _only_user(current)
    if user is None or user.op_type != "Mul" or producer_op(other_operand(user, current)) == "Mul":
        return None, output
    scale = affine_param(facts, other_operand(user, current), rank, norm_shape, dtype)
    if scale is None:
        return None, output
    nodes.extend([*extra, user])
    return scale, user.outputs[0]
