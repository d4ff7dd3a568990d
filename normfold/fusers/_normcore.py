"""The matcher both norm fusers share: the core ``(x - mean(x)) / sqrt(var(x) + eps)`` over some axes.

Hand-written LayerNorm and GroupNorm share this core, which exporters spell in several ways:

* ``mean``: ``ReduceMean(x, axes, keepdims=1)`` (axes an attribute below opset 18, an input from 18);
* the square: ``Pow(d, 2)`` or ``Mul(d, d)``; the variance may reuse ``d`` or recompute its own mean
  (``torch.var``), and the dynamo exporter reduces it with ``keepdims=0`` and restores the dims with
  ``Reshape``/``Expand``;
* the division: ``Div(d, s)``, ``Mul(d, Reciprocal(s))`` or ``Mul(d, Div(1, s))`` (``torch.rsqrt``);
  ``s`` is ``Sqrt(v + eps)`` or ``Pow(v + eps, 0.5)``.

:func:`match_core` returns a :class:`NormCore`, a :class:`Reject` that says *why* a site that looks like
a norm is not one (Bessel-corrected variance, eps added to the std, non-constant eps, mismatched axes,
statistics of another tensor), or ``None`` for sites that are not candidates at all.

The constants, shapes and dtypes it reasons about come from :class:`normfold.fusers._facts.GraphFacts`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from normfold.fusers._facts import GraphFacts
from normfold.fusers._graph import attr_int, attr_ints, other_operand, producer_op, value_uses
from normfold.fusers.base import Reject


@dataclass
class NormCore:
    """``(x - mean) / sqrt(var + eps)`` over ``axes`` of ``x``; ``output`` is the normalized value."""

    x: ir.Value
    axes: tuple[int, ...]
    rank: int | None
    eps: float
    output: ir.Value
    anchor: ir.Node
    nodes: list[ir.Node] = field(default_factory=list)


def reduce_axes(facts: GraphFacts, node: ir.Node) -> tuple[int, ...] | str | None:
    """Axes of a Reduce* node (attribute or input); ``"all"`` when it reduces every axis; None if unknown."""
    attr = attr_ints(node, "axes")
    if attr is not None:
        return tuple(attr)
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = facts.const(node.inputs[1])
        return None if axes is None else tuple(int(i) for i in axes.reshape(-1))
    if attr_int(node, "noop_with_empty_axes", 0):
        return ()
    return "all"


def normalize_axes(axes: tuple[int, ...] | str, rank: int | None) -> tuple[int, ...] | None:
    """Sorted non-negative axes when the rank is known; sorted negative-only axes otherwise."""
    if axes == "all":
        return tuple(range(rank)) if rank is not None else None
    assert not isinstance(axes, str)
    if rank is not None:
        return tuple(sorted({a % rank for a in axes}))
    if all(a < 0 for a in axes):
        return tuple(sorted(set(axes)))
    return None


def _consumers(value: ir.Value) -> list[ir.Node]:
    return [use.node for use in value_uses(value)]


@dataclass
class _Match:
    nodes: list[ir.Node] = field(default_factory=list)

    def add(self, *nodes: ir.Node | None) -> None:
        for node in nodes:
            if node is not None and all(node is not n for n in self.nodes):
                self.nodes.append(node)


def _is_mean_of(facts: GraphFacts, value: ir.Value | None, x: ir.Value) -> ir.Node | None:
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "ReduceMean" or node.inputs[0] is not x:
        return None
    if not attr_int(node, "keepdims", 1):
        return None
    return node


def _find_normalize(facts: GraphFacts, d: ir.Value) -> tuple[ir.Node, ir.Value, ir.Node | None] | None:
    """The node dividing ``d`` by a std: (node, std value, reciprocal node or None)."""
    for node in _consumers(d):
        if node.op_type == "Div" and node.inputs[0] is d and node.inputs[1] is not d:
            return node, node.inputs[1], None  # type: ignore[return-value]
        if node.op_type == "Mul":
            other = other_operand(node, d)
            producer = other.producer() if other is not None else None
            if producer is None or other is d:
                continue
            if producer.op_type == "Reciprocal":
                return node, producer.inputs[0], producer  # type: ignore[return-value]
            if producer.op_type == "Div" and facts.scalar(producer.inputs[0]) == 1.0:
                return node, producer.inputs[1], producer  # type: ignore[return-value]
    return None


def _looks_like_std(value: ir.Value) -> bool:
    return producer_op(value) in {"Sqrt", "Add", "Pow"}


def match_core(facts: GraphFacts, mean_node: ir.Node) -> NormCore | Reject | None:
    """Match the normalization core anchored at ``mean_node`` (the ReduceMean of the mean)."""
    if mean_node.op_type != "ReduceMean" or not attr_int(mean_node, "keepdims", 1):
        return None
    x = mean_node.inputs[0]
    mean = mean_node.outputs[0]
    if x is None:
        return None
    found = None
    for sub in _consumers(mean):
        if sub.op_type == "Sub" and sub.inputs[0] is x and sub.inputs[1] is mean:
            normalize = _find_normalize(facts, sub.outputs[0])
            if normalize is not None and _looks_like_std(normalize[1]):
                found = (sub, *normalize)
                break
    if found is None:
        return None
    sub, div, std, recip = found
    d = sub.outputs[0]
    site = (mean_node, sub, div)
    m = _Match()
    m.add(mean_node, sub, recip, div)

    rank = facts.rank(x)
    raw_axes = reduce_axes(facts, mean_node)
    if raw_axes is None:
        return Reject(site, f"the mean's reduction axes ({mean_node.name}) are not constant")
    axes = normalize_axes(raw_axes, rank)
    if axes is None:
        return Reject(site, f"cannot resolve reduction axes {raw_axes} without the input rank")

    # std = Sqrt(var + eps) | Pow(var + eps, 0.5); the look-alike Sqrt(var) + eps puts eps on the std.
    std_node = std.producer()
    assert std_node is not None
    if std_node.op_type == "Add" and any(producer_op(v) == "Sqrt" for v in std_node.inputs):
        return Reject(
            site,
            "eps is added to the standard deviation, not to the variance: (x-μ)/(σ+ε) is not a LayerNorm/GroupNorm",
        )
    if std_node.op_type == "Sqrt" or (std_node.op_type == "Pow" and facts.scalar(std_node.inputs[1]) == 0.5):
        ve = std_node.inputs[0]
    else:
        return Reject(site, f"the divisor is {std_node.op_type}({std_node.name}), not sqrt(variance + eps)")
    m.add(std_node)
    assert ve is not None
    eps = 0.0
    var: ir.Value | None = ve
    add = ve.producer()
    if add is not None and add.op_type == "Add":
        a, b = add.inputs[0], add.inputs[1]
        if facts.scalar(b) is not None:
            var, eps_value = a, b
        elif facts.scalar(a) is not None:
            var, eps_value = b, a
        else:
            const_like = b if producer_op(a) in _VAR_OPS else a
            array = facts.const(const_like)
            label = const_like.name if const_like is not None else None
            if array is not None:
                return Reject(site, f"epsilon {label!r} is not one scalar (shape {array.shape})")
            return Reject(site, f"epsilon {label!r} is not a constant (computed at run time)")
        eps = float(facts.scalar(eps_value))  # type: ignore[arg-type]
        m.add(add)
    assert var is not None
    reason = _match_variance(facts, var, x, d, axes, rank, m)
    if reason is not None:
        return Reject(site, reason)

    output = div.outputs[0]
    leak = _leak_reason(m.nodes, output, x)
    if leak is not None:
        return Reject(site, leak)
    return NormCore(x=x, axes=axes, rank=rank, eps=eps, output=output, anchor=mean_node, nodes=m.nodes)


def _leak_reason(nodes: list[ir.Node], output: ir.Value, x: ir.Value) -> str | None:
    """Why a value inside the matched core is needed outside it (so the core cannot be replaced)."""
    internal = {id(n) for n in nodes}
    graph_outputs = set(x.graph.outputs) if x.graph is not None else set()
    for node in nodes:
        for out in node.outputs:
            if out is output:
                continue
            if out in graph_outputs:
                return f"intermediate {out.name!r} is a graph output"
            for user in _consumers(out):
                if id(user) not in internal:
                    return f"intermediate {out.name!r} is also used by {user.op_type} {user.name!r}"
    return None


_VAR_OPS = {"ReduceMean", "ReduceSum", "Div", "Mul", "Expand", "Reshape", "Unsqueeze"}


def _keepdims_shape(facts: GraphFacts, x: ir.Value, axes: tuple[int, ...]) -> tuple[int, ...] | None:
    shape = facts.static_shape(x)
    if shape is None:
        return None
    rank = len(shape)
    reduced = {a % rank for a in axes}
    return tuple(1 if i in reduced else d for i, d in enumerate(shape))


def _reduced_count(facts: GraphFacts, x: ir.Value, axes: tuple[int, ...]) -> int | None:
    shape = facts.shape(x)
    if shape is None:
        return None
    dims = [shape[a % len(shape)] for a in axes]
    if any(d is None for d in dims):
        return None
    return int(np.prod([d for d in dims if d is not None]))


def _match_variance(
    facts: GraphFacts,
    var: ir.Value,
    x: ir.Value,
    d: ir.Value,
    axes: tuple[int, ...],
    rank: int | None,
    m: _Match,
) -> str | None:
    """None when ``var`` is the population variance of ``x`` over ``axes``; else the reason it is not."""
    node = var.producer()
    if node is None:
        return f"the variance {var.name!r} is not computed from the input (stored statistics, as in BatchNorm)"
    # keepdims=0 reductions restored by Reshape/Expand/Unsqueeze (dynamo's torch.var).
    restore: list[ir.Node] = []
    while node is not None and node.op_type in ("Reshape", "Expand", "Unsqueeze"):
        restore.append(node)
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
    if restore:
        want = _keepdims_shape(facts, x, axes)
        got = facts.static_shape(var)
        if want is None or got is None or want != got:
            return (
                f"cannot prove that {restore[0].op_type} {restore[0].name!r} restores the reduced axes "
                f"of the variance (shape {got}, expected {want})"
            )
    if node is None:
        return f"the variance {var.name!r} is not computed from the input (stored statistics, as in BatchNorm)"
    op = node.op_type
    if op in ("Div", "Mul"):
        return _rescaled_variance_reason(facts, node, x, axes)
    if op == "ReduceSum":
        return "the sum of squared deviations is not divided by n (not a mean)"
    if op != "ReduceMean":
        return f"the variance is produced by {op} {node.name!r}, not by ReduceMean of squared deviations"
    keep = attr_int(node, "keepdims", 1)
    if not keep and not restore:
        return "the variance is reduced with keepdims=0 and not broadcast back"
    raw = reduce_axes(facts, node)
    v_axes = normalize_axes(raw, rank) if raw is not None else None
    if v_axes != axes:
        return f"the variance reduces over axes {_fmt(v_axes or raw)} but the mean over axes {_fmt(axes)}"
    sq = node.inputs[0]
    sq_node = sq.producer() if sq is not None else None
    if sq_node is None:
        return "the variance input is not a squared deviation"
    is_square = sq_node.op_type == "Mul" and sq_node.inputs[0] is sq_node.inputs[1]
    is_square |= sq_node.op_type == "Pow" and facts.scalar(sq_node.inputs[1]) == 2.0
    if is_square:
        dev = sq_node.inputs[0]
    else:
        return f"the variance input is {sq_node.op_type} {sq_node.name!r}, not a squared deviation"
    m.add(*restore, node, sq_node)
    if dev is d:
        return None
    dev_node = dev.producer() if dev is not None else None
    if dev_node is None or dev_node.op_type != "Sub":
        return "the variance is not taken of the deviation from the mean"
    if dev_node.inputs[0] is not x:
        return "the variance is computed from a different tensor than the one being normalized"
    mean2 = _is_mean_of(facts, dev_node.inputs[1], x)
    if mean2 is None:
        return "the variance's mean is not ReduceMean of the normalized tensor"
    raw2 = reduce_axes(facts, mean2)
    axes2 = normalize_axes(raw2, rank) if raw2 is not None else None
    if axes2 != axes:
        return f"the variance's mean reduces over axes {_fmt(axes2 or raw2)} but the mean over axes {_fmt(axes)}"
    m.add(dev_node, mean2)
    return None


def _rescaled_variance_reason(facts: GraphFacts, node: ir.Node, x: ir.Value, axes: tuple[int, ...]) -> str:
    """Explain a variance computed as a sum or mean of squares times a factor (n/(n-1), 1/(n-1)...)."""
    n = _reduced_count(facts, x, axes)
    if node.op_type == "Div":
        den = node.inputs[1]
        den_node = den.producer() if den is not None else None
        if den_node is not None and den_node.op_type == "Sub" and facts.scalar(den_node.inputs[1]) == 1.0:
            return "unbiased (Bessel-corrected) variance: divided by n-1 (torch.var default, correction=1)"
        c = facts.scalar(den)
        if c is not None and n is not None and c == n - 1:
            return f"unbiased (Bessel-corrected) variance: sum of squares divided by n-1 = {c:g}"
        if c is not None and n is not None and c == n:
            return (
                f"the variance is a sum of squares divided by n = {n}; exact, but spelled as ReduceSum/Div, "
                "which this fuser does not rewrite"
            )
        if c is not None:
            return f"the variance is divided by {c:g}, not a population variance (n = {n})"
    if node.op_type == "Mul":
        for v in node.inputs:
            c = facts.scalar(v)
            if c is not None and n is not None and n > 1 and np.isclose(c, n / (n - 1)):
                return "unbiased (Bessel-corrected) variance: scaled by n/(n-1)"
    return f"the variance is rescaled by {node.op_type} {node.name!r}; not a population variance"


def _fmt(axes: object) -> str:
    return "all" if axes == "all" else str(list(axes)) if isinstance(axes, tuple) else str(axes)
