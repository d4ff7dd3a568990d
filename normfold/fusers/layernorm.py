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

import numpy as np
import onnx_ir as ir

from normfold.exporter.provenance import set_module_path
from normfold.fusers._normcore import (
    GraphFacts,
    Names,
    NormCore,
    Reject,
    add_initializer,
    match_core,
    other_operand,
    owner_path,
    remove_dead,
    replace_output,
    single_consumer,
)
from normfold.fusers._opset import opset_plan, raise_opset
from normfold.fusers.base import NormfoldPass, register_pass

logger = logging.getLogger(__name__)

LAYERNORM_OPSET = 17
_LN_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


@register_pass
class LayerNormFusion(NormfoldPass):
    """ReduceMean-Sub-(Pow|Mul)-ReduceMean-Add(ε)-Sqrt-(Div|Reciprocal·Mul)[-Mul(γ)][-Add(β)] → LN-17."""

    name = "fuse_layernorm"

    def run(self, model: ir.Model) -> bool:
        facts = GraphFacts(model)
        graph = model.graph
        raise_to, opset_reason = opset_plan(model, self.ctx.target_opset, LAYERNORM_OPSET, "LayerNormalization")
        created: list[ir.Node] = []
        names = Names(model)
        if any(n.op_type in ("ReduceMean",) for n in graph):
            facts.prime()
        for node in [n for n in graph if n.op_type == "ReduceMean" and n.domain in ("", "ai.onnx")]:
            if node.graph is not graph:
                continue  # removed by an earlier fusion
            found = match_core(facts, node)
            if found is None:
                continue
            if isinstance(found, Reject):
                self.skipped(found.nodes, found.reason)
                continue
            if self.site_disabled(found.nodes[0].name or ""):
                self.skipped(found.nodes, "disabled by verification at this site")
                continue
            plan = self._plan(facts, found)
            if isinstance(plan, Reject):
                self.skipped(plan.nodes, plan.reason)
                continue
            if opset_reason is not None:
                self.skipped(found.nodes, opset_reason)
                continue
            created.append(self._rewrite(graph, names, plan))
        if created and raise_to is not None:
            raise_opset(model, raise_to, exclude=created)
        return bool(created)

    def _plan(self, facts: GraphFacts, core: NormCore) -> _Plan | Reject:
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
        if dtype not in _LN_TYPES:
            return Reject(nodes, f"input dtype {dtype} is not supported by LayerNormalization")
        shape = facts.shape(core.x)
        assert shape is not None
        norm_shape = shape[rank - k :]
        plan = _Plan(core=core, axis=rank - k, dtype=dtype, norm_shape=norm_shape)
        # Optional affine: Mul(y, γ) then Add(·, β), each absorbed only when it broadcasts over A alone.
        current = core.output
        mul = single_consumer(current, "Mul")
        if mul is not None:
            gamma = _affine_param(facts, other_operand(mul, current), rank, norm_shape, dtype)
            if gamma is not None:
                plan.scale, plan.extra = gamma, [mul]
                current = mul.outputs[0]
        add = single_consumer(current, "Add")
        if add is not None:
            beta = _affine_param(facts, other_operand(add, current), rank, norm_shape, dtype)
            if beta is not None:
                plan.bias = beta
                plan.extra.append(add)
                current = add.outputs[0]
        plan.output = current
        if plan.scale is None and any(d is None for d in norm_shape):
            return Reject(nodes, f"normalized dims {norm_shape} are not static: cannot build a ones scale")
        return plan

    def _rewrite(self, graph: ir.Graph, names: Names, plan: _Plan) -> ir.Node:
        core = plan.core
        base = core.output.name or "layernorm"
        dims = tuple(int(d) for d in plan.norm_shape) if all(d is not None for d in plan.norm_shape) else None
        inputs: list[ir.Value | None] = [core.x]
        for param, suffix, fill in ((plan.scale, "scale", 1.0), (plan.bias, "bias", None)):
            if param is None:
                if fill is not None:
                    assert dims is not None
                    inputs.append(add_initializer(graph, names, f"{base}_ln_{suffix}", _ones(dims, plan.dtype)))
                continue
            if isinstance(param, np.ndarray):
                inputs.append(add_initializer(graph, names, f"{base}_ln_{suffix}", param))
            else:
                inputs.append(param)
        stash = ir.DataType.DOUBLE if plan.dtype == ir.DataType.DOUBLE else ir.DataType.FLOAT
        replaced = [*core.nodes, *plan.extra]
        ln = ir.node(
            "LayerNormalization",
            inputs,
            attributes={"axis": plan.axis, "epsilon": float(core.eps), "stash_type": int(stash)},
            name=names.fresh(f"{core.anchor.name or 'ReduceMean'}_LayerNormalization"),
        )
        set_module_path(ln, owner_path(replaced, core.anchor))
        out = plan.output
        assert out is not None
        ln.outputs[0].dtype = plan.dtype
        ln.outputs[0].shape = out.shape
        producer = out.producer()
        assert producer is not None
        graph.insert_after(producer, ln)  # every replaced node is an ancestor of ``out``
        replace_output(names, out, ln.outputs[0], f"{base}_ln")
        remove_dead(graph, reversed(replaced))
        self.applied(
            replaced,
            f"LayerNormalization(axis={plan.axis}, epsilon={core.eps:g}, stash_type={int(stash)}, "
            f"affine={_affine_name(plan)})",
        )
        return ln


class _Plan:
    """What to emit for one matched LayerNorm site."""

    def __init__(self, core: NormCore, axis: int, dtype: ir.DataType, norm_shape: tuple[int | None, ...]) -> None:
        self.core = core
        self.axis = axis
        self.dtype = dtype
        self.norm_shape = norm_shape
        self.scale: np.ndarray | ir.Value | None = None
        self.bias: np.ndarray | ir.Value | None = None
        self.extra: list[ir.Node] = []
        self.output: ir.Value | None = None


def _affine_param(
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


def _affine_name(plan: _Plan) -> str:
    name = "scale" if plan.scale is not None else "none"
    return name + ("+bias" if plan.bias is not None else "")


def _ones(dims: tuple[int, ...], dtype: ir.DataType) -> np.ndarray:
    return np.ones(dims, dtype=dtype.numpy())
