"""Fuse hand-written LayerNorm into ONNX ``LayerNormalization`` (opset ≥ 17, stash_type=1).

Algebra: with the normalized axes ``A = [axis, rank)`` and ``n = Π shape[A]``,

    μ = ReduceMean(x, A),  σ² = ReduceMean((x − μ)², A)          (population variance, 1/n)
    y = (x − μ) / sqrt(σ² + ε) · γ + β  ≡  LayerNormalization(x, γ, β, axis, epsilon=ε)

which holds when γ and β broadcast only over the normalized dims (they become the op's Scale and B,
materialized at the normalized shape ``shape[A]``). Without an affine, Scale is a ones initializer and B
is omitted. The matcher (:mod:`normfold.fusers._normcore`) accepts Pow(d, 2) or Mul(d, d), Div or
Reciprocal·Mul / Div(1, ·)·Mul (``torch.rsqrt``), axes as attribute (< 18) or input (≥ 18), and a
variance that recomputes its own mean (``torch.var(unbiased=False)``).

Why not onnxscript's ``fuse_layer_normalization`` (``rules/fusion/_layer_norm.py``): it matches only
``axes=[-1]`` given as an input, requires the scale Mul (no-affine LN is not matched), accepts only
f32/f64 inputs, does not check that the scale broadcasts over the normalized dims only, and a look-alike
(Bessel-corrected variance, eps on the std) is a silent non-match where normfold must report a reason.

Look-alikes are refused with the reason: unbiased variance, eps added to the std, non-constant eps or
statistics, reduction axes that are not the trailing ones or differ between the two means.

Models below opset 17 are fused only when ``ctx.target_opset`` ≥ 17 asks to raise the opset and
:func:`normfold.fusers._opset.opset_raise_blocker` finds nothing whose meaning would change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from normfold.fusers._facts import GraphFacts
from normfold.fusers._graph import other_operand, single_consumer, swap_chain
from normfold.fusers._normcore import NormCore, match_core
from normfold.fusers.base import Reject, Rule, Scope, Site, register_rule

logger = logging.getLogger(__name__)

LAYERNORM_OPSET = 17
_LN_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


@dataclass(frozen=True, eq=False)
class LayerNormSite(Site):
    """A matched LayerNorm: the core, the absorbed affine (γ/β as arrays of the normalized shape, or
    values used as they are) and the value the fused node replaces."""

    core: NormCore
    axis: int
    dtype: ir.DataType
    norm_shape: tuple[int | None, ...]
    scale: np.ndarray | ir.Value | None
    bias: np.ndarray | ir.Value | None
    output: ir.Value


@register_rule
class LayerNormFusion(Rule[LayerNormSite]):
    """ReduceMean-Sub-(Pow|Mul)-ReduceMean-Add(ε)-Sqrt-(Div|Reciprocal·Mul)[-Mul(γ)][-Add(β)] → LN-17."""

    name = "fuse_layernorm"
    anchors = ("ReduceMean", "ReduceSum")
    opset = (LAYERNORM_OPSET, "LayerNormalization")
    prime_facts = True

    def match(self, facts: GraphFacts, node: ir.Node) -> LayerNormSite | Reject | None:
        core = match_core(facts, node)
        if core is None or isinstance(core, Reject):
            return core
        nodes = tuple(core.nodes)
        rank = core.rank
        if rank is None:
            return Reject(nodes, "the input rank is unknown, so the normalized axes cannot be checked")
        k = len(core.axes)
        if k == 0 or core.axes != tuple(range(rank - k, rank)):
            return Reject(
                nodes,
                f"reduction axes {list(core.axes)} are not the trailing axes of a rank-{rank} input; "
                "LayerNormalization normalizes from `axis` to the last axis",
            )
        dtype = facts.dtype(core.x)
        shape = facts.shape(core.x)
        if dtype not in _LN_TYPES or shape is None:
            return Reject(nodes, f"input dtype {dtype} is not supported by LayerNormalization")
        norm_shape = shape[rank - k :]
        # Optional affine: Mul(y, γ) then Add(·, β), each absorbed only when it broadcasts over A alone.
        extra: list[ir.Node] = []
        params: list[np.ndarray | ir.Value | None] = []
        current = core.output
        for op in ("Mul", "Add"):
            user = single_consumer(current, op)
            param = affine_param(facts, other_operand(user, current), rank, norm_shape, dtype) if user else None
            params.append(param)
            if user is not None and param is not None:
                extra.append(user)
                current = user.outputs[0]
        if params[0] is None and any(d is None for d in norm_shape):
            return Reject(nodes, f"normalized dims {norm_shape} are not static: cannot build a ones scale")
        return LayerNormSite(
            nodes=(*nodes, *extra),
            anchor=core.anchor,
            core=core,
            axis=rank - k,
            dtype=dtype,
            norm_shape=norm_shape,
            scale=params[0],
            bias=params[1],
            output=current,
        )

    def rewrite(self, scope: Scope, site: LayerNormSite) -> list[ir.Node]:
        core = site.core
        base = core.output.name or "layernorm"
        inputs: list[ir.Value | None] = [core.x]
        scale = site.scale
        if scale is None:
            scale = np.ones(tuple(int(d) for d in site.norm_shape if d is not None), dtype=site.dtype.numpy())
        for param, suffix in ((scale, "scale"), (site.bias, "bias")):
            if isinstance(param, np.ndarray):
                inputs.append(scope.constant(param, f"{base}_ln_{suffix}"))
            elif param is not None:
                inputs.append(param)
        ln = ir.node(
            "LayerNormalization",
            inputs,
            attributes={"axis": site.axis, "epsilon": float(core.eps), "stash_type": int(_stash(site))},
            name=scope.names.fresh(f"{core.anchor.name or 'ReduceMean'}_LayerNormalization"),
        )
        swap_chain(
            scope.graph,
            scope.names,
            site.nodes,
            ln,
            site.output,
            owner=core.anchor,
            dtype=site.dtype,
            base=f"{base}_ln",
        )
        return [ln]

    def describe(self, site: LayerNormSite, created: list[ir.Node]) -> str:
        affine = ("scale" if site.scale is not None else "none") + ("+bias" if site.bias is not None else "")
        return (
            f"LayerNormalization(axis={site.axis}, epsilon={site.core.eps:g}, stash_type={int(_stash(site))}, "
            f"affine={affine})"
        )


def _stash(site: LayerNormSite) -> ir.DataType:
    return ir.DataType.DOUBLE if site.dtype == ir.DataType.DOUBLE else ir.DataType.FLOAT


def affine_param(
    facts: GraphFacts,
    param: ir.Value | None,
    rank: int,
    norm_shape: tuple[int | None, ...],
    dtype: ir.DataType,
) -> np.ndarray | ir.Value | None:
    """γ or β as an array of shape ``norm_shape`` (or the value itself), when it broadcasts over A only."""
    if param is None or facts.dtype(param) not in (dtype, None):
        return None
    shape = facts.shape(param)
    if shape is None or len(shape) > rank:
        return None
    k = len(norm_shape)
    lead = shape[: max(0, len(shape) - k)]
    if any(d != 1 for d in lead):
        return None  # γ varies over a non-normalized axis: not a LayerNorm affine
    tail = shape[len(lead) :]
    array = facts.const(param)
    if array is not None:
        if any(d is None for d in norm_shape):
            return None
        full = tuple(int(d) for d in norm_shape if d is not None)
        try:
            target = np.broadcast_shapes(array.reshape(tail).shape, full)  # type: ignore[arg-type]
        except ValueError:
            return None
        if target != full:
            return None
        return np.broadcast_to(array.reshape(tail), full).astype(dtype.numpy()).copy()  # type: ignore[arg-type]
    if len(tail) == k and tail == norm_shape and len(shape) == k:
        return param
    return None
