"""The matcher both norm fusers share: the core ``(x - mean(x)) / sqrt(var(x) + eps)`` over some axes.

Hand-written LayerNorm and GroupNorm share this core, which exporters spell in several ways:

* ``mean``: ``ReduceMean(x, axes, keepdims=1)`` (axes an attribute below opset 18, an input from 18),
  or a sum divided by the element count: one multi-axis ``ReduceSum`` or a chain of single-axis ones
  (``x.sum(2).sum(3).sum(4) / n``, all ``keepdims=1``), then ``Div(·, n)`` or ``Mul(·, 1/n)`` with ``n``
  the constant product of the reduced dims (Σx/n ≡ mean; a divisor n−1 is Bessel's correction, refused);
* the square: ``Pow(d, 2)`` or ``Mul(d, d)``; the variance may reuse ``d`` or recompute its own mean
  (``torch.var``), and the dynamo exporter reduces it with ``keepdims=0`` and restores the dims with
  ``Reshape``/``Expand``;
* the division: ``Div(d, s)``, ``Mul(d, Reciprocal(s))`` or ``Mul(d, Div(1, s))`` (``torch.rsqrt``);
  ``s`` is ``Sqrt(v + eps)`` or ``Pow(v + eps, 0.5)``; or ``Mul(d, Pow(v + eps, -0.5))`` (rsqrt as a power).

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


@dataclass
class Mean:
    """``mean(x)`` over ``axes`` (normalized, keepdims), computed by ``nodes``."""

    x: ir.Value
    axes: tuple[int, ...]
    nodes: list[ir.Node]


def mean_of(facts: GraphFacts, value: ir.Value | None, *, dropped_ok: bool = False) -> Mean | str | None:
    """``value`` as a mean of some tensor: ``ReduceMean`` or ``ReduceSum``-chain / n (module docstring).

    None when ``value`` is not a mean-like reduction at all; a string when it is one but not a mean
    (divided by n−1 or another constant, unresolvable axes). ``dropped_ok`` accepts ``keepdims=0`` on a
    ``ReduceMean`` whose caller restores the dims.
    """
    node = value.producer() if value is not None else None
    if node is None:
        return None
    if node.op_type == "ReduceMean":
        if not attr_int(node, "keepdims", 1) and not dropped_ok:
            return "the variance is reduced with keepdims=0 and not broadcast back"
        x = node.inputs[0]
        raw = reduce_axes(facts, node)
        if x is None or raw is None:
            return f"the reduction axes of {node.name!r} are not constant"
        axes = normalize_axes(raw, facts.rank(x))
        if axes is None:
            return f"cannot resolve reduction axes {_fmt(raw)} without the input rank"
        return Mean(x, axes, [node])
    if node.op_type not in ("Div", "Mul"):
        return None
    for total in node.inputs[:1] if node.op_type == "Div" else node.inputs:
        if producer_op(total) == "ReduceSum":
            assert total is not None
            return _sum_over_count(facts, node, total)
    return None


def _sum_over_count(facts: GraphFacts, node: ir.Node, total: ir.Value) -> Mean | str | None:
    """``Σ_A x / n`` (``node`` is the Div or Mul) as the mean over A when the constant is n (or 1/n)."""
    chain: list[ir.Node] = []
    producer = total.producer()
    while producer is not None and producer.op_type == "ReduceSum" and attr_int(producer, "keepdims", 1):
        chain.append(producer)
        src = producer.inputs[0]
        producer = src.producer() if src is not None and producer_op(src) == "ReduceSum" else None
    if not chain:
        return None
    x = chain[-1].inputs[0]
    rank = facts.rank(x)
    axes: set[int] = set()
    for reduce in chain:
        raw = reduce_axes(facts, reduce)
        resolved = normalize_axes(raw, rank) if raw is not None else None
        if resolved is None:
            return f"the axes of sum {reduce.name!r} cannot be resolved (not constant or rank unknown)"
        axes.update(resolved)
    assert x is not None
    c = facts.scalar(other_operand(node, total))
    if c is None:
        return None
    n = _reduced_count(facts, x, tuple(sorted(axes)))
    if n is None:
        return "the reduced element count n is not static: cannot prove that the sum is divided by n"
    divisor = c if node.op_type == "Div" else (1.0 / c if c else float("inf"))
    if np.isclose(divisor, n, rtol=1e-6, atol=0.0):
        return Mean(x, tuple(sorted(axes)), [*reversed(chain), node])
    if n > 1 and np.isclose(divisor, n - 1, rtol=1e-6, atol=0.0):
        return f"unbiased (Bessel-corrected) variance: sum of squares divided by n-1 = {n - 1}"
    return f"the sum over axes {sorted(axes)} is divided by {divisor:g}, not by the element count n = {n}"


def anchor_mean(node: ir.Node) -> ir.Value | None:
    """The mean value an anchor starts: a ReduceMean's output, or the ``/ n`` after a chain of ReduceSums
    that starts at ``node`` (the first sum of the chain, so each chain is visited once)."""
    if node.op_type == "ReduceMean":
        return node.outputs[0] if attr_int(node, "keepdims", 1) else None
    if node.op_type != "ReduceSum" or producer_op(node.inputs[0]) == "ReduceSum":
        return None
    current = node
    while attr_int(current, "keepdims", 1):
        users = _consumers(current.outputs[0])
        if len(users) != 1:
            return None
        if users[0].op_type != "ReduceSum":
            return users[0].outputs[0] if users[0].op_type in ("Div", "Mul") else None
        current = users[0]
    return None


def _find_normalize(facts: GraphFacts, d: ir.Value) -> tuple[ir.Node, ir.Value, ir.Node | None] | None:
    """The node dividing ``d`` by a std: (node, std value, reciprocal node or None). For
    ``Mul(d, Pow(v + ε, -0.5))`` the "std" is ``v + ε`` itself and the reciprocal node is the Pow."""
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
            if producer.op_type == "Pow" and facts.scalar(producer.inputs[1]) == -0.5:
                return node, producer.inputs[0], producer  # type: ignore[return-value]
            if producer.op_type == "Div" and facts.scalar(producer.inputs[0]) == 1.0:
                return node, producer.inputs[1], producer  # type: ignore[return-value]
    return None


def _looks_like_std(value: ir.Value) -> bool:
    return producer_op(value) in {"Sqrt", "Add", "Pow"}


def match_core(facts: GraphFacts, mean_node: ir.Node) -> NormCore | Reject | None:
    """Match the normalization core anchored at ``mean_node``: the ReduceMean of the mean, or the first
    ReduceSum of a ``Σx / n`` mean."""
    mean = anchor_mean(mean_node)
    x = mean_node.inputs[0]
    if mean is None or x is None:
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
    parsed = mean_of(facts, mean)
    if parsed is None or isinstance(parsed, str):
        return None if parsed is None else Reject(site, parsed)
    m.add(*parsed.nodes, sub, recip, div)
    rank, axes = facts.rank(x), parsed.axes

    ve = _variance_plus_eps(facts, std, recip)
    if isinstance(ve, str):
        return Reject(site, ve)
    m.add(std.producer() if ve is not std else None)
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
    leak = leak_reason(m.nodes, output, x)
    if leak is not None:
        return Reject(site, leak)
    return NormCore(x=x, axes=axes, rank=rank, eps=eps, output=output, anchor=mean_node, nodes=m.nodes)


def _variance_plus_eps(facts: GraphFacts, std: ir.Value, recip: ir.Node | None) -> ir.Value | str:
    """``v + ε`` under the std: ``Sqrt(v + ε)``, ``Pow(v + ε, 0.5)``, or ``std`` itself when the divisor
    is ``Pow(v + ε, -0.5)``; else why the divisor is not ``sqrt(variance + eps)``."""
    if recip is not None and recip.op_type == "Pow":
        return std
    std_node = std.producer()
    assert std_node is not None
    # The look-alike Sqrt(var) + eps puts eps on the std.
    if std_node.op_type == "Add" and any(producer_op(v) == "Sqrt" for v in std_node.inputs):
        return "eps is added to the standard deviation, not to the variance: (x-μ)/(σ+ε) is not a LayerNorm/GroupNorm"
    if std_node.op_type == "Sqrt" or (std_node.op_type == "Pow" and facts.scalar(std_node.inputs[1]) == 0.5):
        ve = std_node.inputs[0]
        assert ve is not None
        return ve
    return f"the divisor is {std_node.op_type}({std_node.name}), not sqrt(variance + eps)"


def leak_reason(nodes: list[ir.Node], output: ir.Value, x: ir.Value) -> str | None:
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
    if op == "ReduceSum":
        return "the sum of squared deviations is not divided by n (not a mean)"
    if op not in ("ReduceMean", "Div", "Mul"):
        return f"the variance is produced by {op} {node.name!r}, not by a mean of squared deviations"
    parsed = mean_of(facts, node.outputs[0], dropped_ok=bool(restore))
    if parsed is None:
        return _rescaled_variance_reason(facts, node, x, axes)
    if isinstance(parsed, str):
        return parsed
    if parsed.axes != axes:
        return f"the variance reduces over axes {_fmt(parsed.axes)} but the mean over axes {_fmt(axes)}"
    sq = parsed.x
    sq_node = sq.producer()
    if sq_node is None:
        return "the variance input is not a squared deviation"
    is_square = sq_node.op_type == "Mul" and sq_node.inputs[0] is sq_node.inputs[1]
    is_square |= sq_node.op_type == "Pow" and facts.scalar(sq_node.inputs[1]) == 2.0
    if is_square:
        dev = sq_node.inputs[0]
    else:
        return f"the variance input is {sq_node.op_type} {sq_node.name!r}, not a squared deviation"
    m.add(*restore, *parsed.nodes, sq_node)
    if dev is d:
        return None
    dev_node = dev.producer() if dev is not None else None
    if dev_node is None or dev_node.op_type != "Sub":
        return "the variance is not taken of the deviation from the mean"
    if dev_node.inputs[0] is not x:
        return "the variance is computed from a different tensor than the one being normalized"
    mean2 = mean_of(facts, dev_node.inputs[1])
    if not isinstance(mean2, Mean) or mean2.x is not x:
        return "the variance's mean is not a mean of the normalized tensor"
    if mean2.axes != axes:
        return f"the variance's mean reduces over axes {_fmt(mean2.axes)} but the mean over axes {_fmt(axes)}"
    m.add(dev_node, *mean2.nodes)
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
