"""Shared matching for the LayerNorm and GroupNorm fusers: the normalization core and graph facts.

Both hand-written norms share one core, ``(x - mean(x)) / sqrt(var(x) + eps)`` over some axes, which
exporters spell in several ways:

* ``mean``: ``ReduceMean(x, axes, keepdims=1)`` (axes an attribute below opset 18, an input from 18);
* the square: ``Pow(d, 2)`` or ``Mul(d, d)``; the variance may reuse ``d`` or recompute its own mean
  (``torch.var``), and the dynamo exporter reduces it with ``keepdims=0`` and restores the dims with
  ``Reshape``/``Expand``;
* the division: ``Div(d, s)``, ``Mul(d, Reciprocal(s))`` or ``Mul(d, Div(1, s))`` (``torch.rsqrt``);
  ``s`` is ``Sqrt(v + eps)`` or ``Pow(v + eps, 0.5)``.

:func:`match_core` returns a :class:`NormCore`, a :class:`Reject` that says *why* a site that looks like
a norm is not one (Bessel-corrected variance, eps added to the std, non-constant eps, mismatched axes,
statistics of another tensor), or ``None`` for sites that are not candidates at all.

:class:`GraphFacts` answers the questions matching needs without touching the model: the constant value
of a small subgraph (``Reshape(Constant, Constant)``, ``Unsqueeze(weight, Range(...))``...), and static
shapes/dtypes from ``onnx.shape_inference`` run on a serialized copy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from normfold.exporter.provenance import module_path

logger = logging.getLogger(__name__)

Shape = tuple[int | None, ...]
SymShape = tuple[int | str | None, ...]

# Ops whose value we compute when all their inputs are constant (cheap, shape-sized data).
_FOLDABLE = {
    "Constant",
    "Identity",
    "Cast",
    "CastLike",
    "Reshape",
    "Unsqueeze",
    "Squeeze",
    "Expand",
    "Concat",
    "Range",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Neg",
    "Gather",
    "Shape",
    "ReduceProd",
    "ConstantOfShape",
}
_MAX_FOLD_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class Reject:
    """A site that looks like a norm but is not one: the nodes and the reason."""

    nodes: tuple[ir.Node, ...]
    reason: str


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


def opset_of(model: ir.Model) -> int:
    """The default-domain opset the model imports (``""`` or ``"ai.onnx"``); 1 when absent."""
    imports = model.opset_imports
    return int(imports.get("", imports.get("ai.onnx", 1)))


def owner_path(nodes: Sequence[ir.Node], preferred: ir.Node | None = None) -> str | None:
    """The module path the fused node should carry: the anchor's, else the first known one."""
    if preferred is not None:
        path = module_path(preferred)
        if path is not None:
            return path
    for node in nodes:
        path = module_path(node)
        if path is not None:
            return path
    return None


class Names:
    """Fresh names for values and nodes of one model, collected once per pass run (linear, not per site)."""

    def __init__(self, model: ir.Model) -> None:
        self._taken: set[str] = set()
        self._next: dict[str, int] = {}  # last suffix per base: repeated bases stay O(1)
        for graph in model.graphs():
            self._taken.update(v.name for v in graph.inputs if v.name)
            self._taken.update(graph.initializers)
            for node in graph:
                if node.name:
                    self._taken.add(node.name)
                self._taken.update(o.name for o in node.outputs if o.name)

    def fresh(self, base: str) -> str:
        name, i = base, self._next.get(base, 0)
        while name in self._taken:
            i += 1
            name = f"{base}_{i}"
        self._next[base] = i
        self._taken.add(name)
        return name


def add_initializer(graph: ir.Graph, names: Names, base: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new initializer with a fresh name and return its value."""
    value = ir.Value(name=names.fresh(base), const_value=ir.Tensor(np.ascontiguousarray(array)))
    value.shape = ir.Shape(array.shape)
    value.dtype = value.const_value.dtype
    graph.register_initializer(value)
    return value


def replace_output(names: Names, old: ir.Value, new: ir.Value, base: str) -> None:
    """Point every use of ``old`` at ``new``; a graph output keeps its public name."""
    was_output = old.is_graph_output()
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    if was_output and old.name is not None:
        public = old.name
        old.name = names.fresh(f"{public}_replaced")
        new.name = public
    else:
        new.name = names.fresh(base)


def remove_dead(graph: ir.Graph, nodes: Iterable[ir.Node]) -> None:
    """Remove ``nodes`` (now unused) and every producer/initializer that only they kept alive."""
    outputs = set(graph.outputs)
    pending = list(nodes)
    removed: set[int] = set()
    while pending:
        node = pending.pop()
        if id(node) in removed or node.graph is not graph:
            continue
        if any(o.uses() or o in outputs for o in node.outputs):
            continue
        inputs = [v for v in node.inputs if v is not None]
        graph.remove(node, safe=True)
        removed.add(id(node))
        for value in inputs:
            if value.uses() or value in outputs:
                continue
            producer = value.producer()
            if producer is not None:
                pending.append(producer)
            elif value.is_initializer() and value not in graph.inputs and value.name is not None:
                graph.initializers.pop(value.name, None)


def other_operand(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """For a binary node that consumes ``value``, the other input."""
    a, b = (*node.inputs, None, None)[:2]
    if a is value:
        return b
    if b is value:
        return a
    return None


def producer_op(value: ir.Value | None) -> str | None:
    if value is None:
        return None
    producer = value.producer()
    return producer.op_type if producer is not None and producer.domain in ("", "ai.onnx") else None


class GraphFacts:
    """Read-only facts about one model: constant values of small subgraphs, static shapes and dtypes."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self._const: dict[ir.Value, np.ndarray | None] = {}  # keyed by the value: ids get reused
        self._inferred: dict[str, tuple[SymShape | None, ir.DataType | None]] | None = None

    def prime(self) -> None:
        """Run shape inference now, while the graph is still the input graph.

        A fused node emitted before the opset is raised (GroupNormalization-21 in an opset-17 graph)
        would make a later inference fail, so passes prime the facts before their first rewrite.
        """
        self._infer()

    # -- shapes ---------------------------------------------------------------------------------
    def _infer(self) -> dict[str, tuple[SymShape | None, ir.DataType | None]]:
        if self._inferred is not None:
            return self._inferred
        self._inferred = {}
        try:
            proto = onnx.shape_inference.infer_shapes(ir.to_proto(self.model), strict_mode=False, data_prop=True)
        except (onnx.shape_inference.InferenceError, ValueError, RuntimeError) as e:
            logger.warning("shape inference failed (%s); matching uses the shapes stored in the model", e)
            return self._inferred
        graph = proto.graph
        for info in [*graph.input, *graph.value_info, *graph.output]:
            tensor_type = info.type.tensor_type
            dtype = ir.DataType(tensor_type.elem_type) if tensor_type.elem_type else None
            shape: SymShape | None = None
            if tensor_type.HasField("shape"):
                shape = tuple(_dim(d) for d in tensor_type.shape.dim)
            self._inferred[info.name] = (shape, dtype)
        return self._inferred

    def sym_shape(self, value: ir.Value | None) -> SymShape | None:
        """Like :meth:`shape`, but a dynamic dim is its symbol (``"n"``) when one is known.

        Two dims with the same symbol are equal at run time: onnx's data propagation names a dim that it
        traced through Shape/Gather/Concat/Reshape after the input dim it came from.
        """
        if value is None:
            return None
        own: SymShape | None = None
        if value.shape is not None:
            own = tuple(d if isinstance(d, int) else _sym(d) for d in value.shape)
        inferred = self._infer().get(value.name or "", (None, None))[0]
        if own is None or (inferred is not None and len(own) != len(inferred)):
            return inferred
        if inferred is None:
            return own
        return tuple(a if a is not None else b for a, b in zip(own, inferred, strict=True))

    def shape(self, value: ir.Value | None) -> Shape | None:
        """The value's shape with ``None`` for unknown dims, or None when even the rank is unknown."""
        if value is None:
            return None
        if value.const_value is not None:
            return tuple(value.const_value.shape.numpy())
        own: Shape | None = None
        if value.shape is not None:
            own = tuple(d if isinstance(d, int) else None for d in value.shape)
            if all(d is not None for d in own):
                return own
        sym = self._infer().get(value.name or "", (None, None))[0]
        inferred = None if sym is None else tuple(d if isinstance(d, int) else None for d in sym)
        if inferred is None:
            return own
        if own is None or len(own) != len(inferred):
            return inferred
        return tuple(a if a is not None else b for a, b in zip(own, inferred, strict=True))

    def rank(self, value: ir.Value | None) -> int | None:
        shape = self.shape(value)
        return None if shape is None else len(shape)

    def static_shape(self, value: ir.Value | None) -> tuple[int, ...] | None:
        shape = self.shape(value)
        if shape is None or any(d is None for d in shape):
            return None
        return tuple(int(d) for d in shape if d is not None)

    def dtype(self, value: ir.Value | None) -> ir.DataType | None:
        if value is None:
            return None
        if value.dtype is not None:
            return value.dtype
        return self._infer().get(value.name or "", (None, None))[1]

    # -- constants ------------------------------------------------------------------------------
    def const(self, value: ir.Value | None) -> np.ndarray | None:
        """The value as a numpy array when it is computable from constants alone, else None."""
        if value is None:
            return None
        if value not in self._const:
            self._const[value] = self._compute(value)
        return self._const[value]

    def scalar(self, value: ir.Value | None) -> float | None:
        """The value as one float when it is a constant whose elements are all equal."""
        array = self.const(value)
        if array is None or array.size == 0:
            return None
        flat = array.reshape(-1)
        if not np.all(flat == flat[0]):
            return None
        return float(flat[0])

    def _compute(self, value: ir.Value) -> np.ndarray | None:
        if value.const_value is not None:
            if value.is_graph_input():
                return None
            return np.asarray(value.const_value.numpy())
        node = value.producer()
        if node is None or node.domain not in ("", "ai.onnx") or node.op_type not in _FOLDABLE:
            return None
        if node.op_type == "Shape":
            return self._shape_of(node)
        if node.op_type == "Constant":
            return _constant_attr(node)
        if node.op_type == "CastLike":
            src = self.const(node.inputs[0])
            like = self.dtype(node.inputs[1])
            if src is None or like is None:
                return None
            return src.astype(like.numpy())
        inputs = [self.const(v) if v is not None else None for v in node.inputs]
        if any(a is None for a, v in zip(inputs, node.inputs, strict=True) if v is not None):
            return None
        try:
            out = _fold(node, inputs)
        except (ValueError, TypeError, IndexError) as e:
            logger.debug("cannot fold %s %s: %s", node.op_type, node.name, e)
            return None
        if out is None or out.size > _MAX_FOLD_ELEMENTS:
            return None
        return out

    def _shape_of(self, node: ir.Node) -> np.ndarray | None:
        shape = self.static_shape(node.inputs[0])
        if shape is None:
            return None
        start = _int_attr(node, "start", 0)
        end_attr = node.attributes.get("end")
        end = end_attr.as_int() if end_attr is not None else None
        return np.asarray(shape[start:end], dtype=np.int64)


def _dim(dim: onnx.TensorShapeProto.Dimension) -> int | str | None:
    if dim.HasField("dim_value"):
        return int(dim.dim_value)
    if dim.HasField("dim_param") and not dim.dim_param.startswith("unk__"):
        return str(dim.dim_param)
    return None


def _sym(dim: object) -> str | None:
    value = getattr(dim, "value", None)
    return value if isinstance(value, str) and not value.startswith("unk__") else None


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def _ints_attr(node: ir.Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    return list(attr.as_ints()) if attr is not None else None


def _constant_attr(node: ir.Node) -> np.ndarray | None:
    for key, attr in node.attributes.items():
        if key == "value":
            return np.asarray(attr.as_tensor().numpy())
        if key == "value_float":
            return np.asarray(attr.as_float(), dtype=np.float32)
        if key == "value_floats":
            return np.asarray(list(attr.as_floats()), dtype=np.float32)
        if key == "value_int":
            return np.asarray(attr.as_int(), dtype=np.int64)
        if key == "value_ints":
            return np.asarray(list(attr.as_ints()), dtype=np.int64)
    return None


def _fold(node: ir.Node, args: list[np.ndarray | None]) -> np.ndarray | None:
    """numpy semantics of the few shape-sized ops exporters put between constants."""
    op = node.op_type
    a = args[0] if args else None
    if a is None:
        return None
    if op == "Identity":
        return a
    if op == "Cast":
        return a.astype(ir.DataType(_int_attr(node, "to", 1)).numpy())
    if op == "Neg":
        return -a
    if op in ("Add", "Sub", "Mul", "Div"):
        b = args[1]
        if b is None:
            return None
        if op == "Div" and np.issubdtype(a.dtype, np.integer):
            return np.trunc(a / b).astype(a.dtype)
        return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op](a, b)
    if op == "Reshape":
        target = [int(t) for t in np.asarray(args[1]).reshape(-1)]
        allowzero = _int_attr(node, "allowzero", 0)
        shape = [a.shape[i] if t == 0 and not allowzero else t for i, t in enumerate(target)]
        return a.reshape(shape)
    if op in ("Unsqueeze", "Squeeze"):
        axes_arr = args[1] if len(args) > 1 else None
        axes = [int(i) for i in axes_arr.reshape(-1)] if axes_arr is not None else _ints_attr(node, "axes")
        if op == "Squeeze":
            return np.squeeze(a, axis=tuple(axes) if axes is not None else None)
        if axes is None:
            return None
        out_rank = a.ndim + len(axes)
        out = a
        for axis in sorted(ax % out_rank for ax in axes):
            out = np.expand_dims(out, axis)
        return out
    if op == "Expand":
        shape = tuple(int(s) for s in np.asarray(args[1]).reshape(-1))
        return np.broadcast_to(a, np.broadcast_shapes(a.shape, shape)).copy()
    if op == "Concat":
        return np.concatenate([x for x in args if x is not None], axis=_int_attr(node, "axis", 0))
    if op == "Range":
        if args[1] is None or args[2] is None:
            return None
        return np.arange(a.item(), args[1].item(), args[2].item(), dtype=a.dtype)
    if op == "Gather":
        return np.take(a, args[1], axis=_int_attr(node, "axis", 0))
    if op == "ReduceProd":
        axes = _ints_attr(node, "axes")
        if len(args) > 1 and args[1] is not None:
            axes = [int(i) for i in args[1].reshape(-1)]
        keep = bool(_int_attr(node, "keepdims", 1))
        return np.prod(a, axis=tuple(axes) if axes else None, keepdims=keep)
    if op == "ConstantOfShape":
        attr = node.attributes.get("value")
        fill = np.asarray(attr.as_tensor().numpy()).reshape(-1) if attr is not None else np.zeros(1, np.float32)
        return np.full(tuple(int(s) for s in a.reshape(-1)), fill[0], dtype=fill.dtype)
    return None


# -- the core matcher ------------------------------------------------------------------------------


def reduce_axes(facts: GraphFacts, node: ir.Node) -> tuple[int, ...] | str | None:
    """Axes of a Reduce* node (attribute or input); ``"all"`` when it reduces every axis; None if unknown."""
    attr = _ints_attr(node, "axes")
    if attr is not None:
        return tuple(attr)
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = facts.const(node.inputs[1])
        return None if axes is None else tuple(int(i) for i in axes.reshape(-1))
    if _int_attr(node, "noop_with_empty_axes", 0):
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


def value_uses(value: ir.Value) -> list[ir.Usage]:
    """Uses that read the value's data: ``Shape``/``Size`` and CastLike's ``target_type`` only read its
    metadata, which a fusion preserves, so they never block one (they die with the pattern or stay valid)."""
    return [
        use
        for use in value.uses()
        if use.node.op_type not in ("Shape", "Size") and not (use.node.op_type == "CastLike" and use.idx == 1)
    ]


def single_consumer(value: ir.Value, op_type: str) -> ir.Node | None:
    """The one node reading ``value``'s data when it is ``op_type`` and ``value`` is not a graph output."""
    if value.is_graph_output():
        return None
    uses = value_uses(value)
    if len(uses) != 1:
        return None
    node = uses[0].node
    return node if node.op_type == op_type and node.domain in ("", "ai.onnx") else None


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
    if not _int_attr(node, "keepdims", 1):
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
    if mean_node.op_type != "ReduceMean" or not _int_attr(mean_node, "keepdims", 1):
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
    var = ve
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
            if array is not None:
                return Reject(site, f"epsilon {const_like.name!r} is not one scalar (shape {array.shape})")
            return Reject(site, f"epsilon {const_like.name!r} is not a constant (computed at run time)")
        eps = float(facts.scalar(eps_value))  # type: ignore[arg-type]
        m.add(add)
    assert var is not None
    reason = _match_variance(facts, var, x, d, axes, rank, m)
    if reason is not None:
        return Reject(site, reason)

    output = div.outputs[0]
    internal = {id(n) for n in m.nodes}
    graph_outputs = set(x.graph.outputs) if x.graph is not None else set()
    for node in m.nodes:
        for out in node.outputs:
            if out is output:
                continue
            if out in graph_outputs:
                return Reject(site, f"intermediate {out.name!r} is a graph output")
            for user in _consumers(out):
                if id(user) not in internal:
                    return Reject(site, f"intermediate {out.name!r} is also used by {user.op_type} {user.name!r}")
    return NormCore(x=x, axes=axes, rank=rank, eps=eps, output=output, anchor=mean_node, nodes=m.nodes)


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
    keep = _int_attr(node, "keepdims", 1)
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
