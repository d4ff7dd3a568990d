"""The onnx_ir helpers of the fusers, in one place: constants, attributes, uses, names, initializers, swaps.

Nothing here mutates an existing initializer. The exporters deduplicate equal tensors (a fresh BN's
running_mean may be the very initializer that is its bias, NORMS.md §2), so folds always write *new*
initializers and leave the old ones to the unused-node cleanup.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir._core import Usage  # onnx_ir does not re-export the type of Value.uses()

from normfold.exporter.provenance import MODULE_PATH_KEY, module_path, set_module_path


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant behind ``value`` (initializer, Constant node, or an Identity of one), else None.

    Graph inputs are never constant, even when an initializer of the same name gives them a default:
    the caller may feed anything at run time.
    """
    seen = 0
    while value is not None and seen < 8:
        if value.is_graph_input():
            return None
        try:
            tensor = ir.convenience.get_const_tensor(value)
        except ValueError:
            return None
        if tensor is not None:
            return np.asarray(tensor.numpy())
        producer = value.producer()
        if producer is None or producer.op_type != "Identity" or producer.domain != "":
            return None
        value = producer.inputs[0]
        seen += 1
    return None


def nonconst_reason(value: ir.Value | None, what: str) -> str:
    """Why ``value`` does not count as a constant, phrased for the report."""
    if value is None:
        return f"{what} is missing"
    if value.is_graph_input():
        return f"{what} '{value.name}' is a graph input (it can change at run time)"
    return f"{what} '{value.name}' is computed at run time, not a constant"


def attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def attr_float(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_float()


def attr_ints(node: ir.Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    return None if attr is None else list(attr.as_ints())


def attr_str(node: ir.Node, name: str, default: str) -> str:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_string()


def sole_consumer(value: ir.Value) -> ir.Node | None:
    """The only node reading ``value`` (and ``value`` is not a graph output), else None."""
    if value.is_graph_output():
        return None
    users = {use.node for use in value.uses()}
    if len(users) != 1 or len(value.uses()) != 1:
        return None
    return next(iter(users))


def other_users(value: ir.Value, allowed: Iterable[ir.Node]) -> list[ir.Node]:
    """Nodes other than ``allowed`` that read ``value``."""
    allowed_set = set(allowed)
    return [use.node for use in value.uses() if use.node not in allowed_set]


def shared_weight_reason(weight: ir.Value, owner: ir.Node, allow_copies: bool) -> str | None:
    """A skip reason when ``weight`` is read by nodes other than ``owner`` and copies are not allowed."""
    others = other_users(weight, [owner])
    if not others or allow_copies:
        return None
    names = ", ".join(repr(n.name) for n in others[:3])
    return (
        f"weight '{weight.name}' is shared with {names}; folding would need a private copy "
        "(pass allow_weight_copies=True / --allow-weight-copies to clone it)"
    )


def stamp(node: ir.Node, source: ir.Node, path: str | None = None) -> ir.Node:
    """Copy the exporter metadata of ``source`` onto ``node`` and record its module path."""
    for key, val in source.metadata_props.items():
        if key != MODULE_PATH_KEY:
            node.metadata_props[key] = val
    set_module_path(node, path if path is not None else module_path(source))
    return node


def clone_node(
    node: ir.Node,
    inputs: Sequence[ir.Value | None],
    *,
    drop_attrs: Iterable[str] = (),
    name: str | None = None,
) -> ir.Node:
    """A new node with ``node``'s op and attributes (minus ``drop_attrs``) on ``inputs``."""
    dropped = set(drop_attrs)
    attrs = [a for a in node.attributes.values() if a.name not in dropped]
    return ir.Node(
        node.domain,
        node.op_type,
        inputs,
        attrs,
        num_outputs=1,
        version=node.version,
        name=name if name is not None else node.name,
    )


def swap(
    graph: ir.Graph,
    old_nodes: Sequence[ir.Node],
    new_nodes: Sequence[ir.Node],
    old_out: ir.Value,
    new_out: ir.Value,
) -> None:
    """Insert ``new_nodes`` where ``old_nodes[0]`` was, route readers of ``old_out`` to ``new_out`` (keeping
    the value name, so graph outputs keep their names) and delete ``old_nodes``."""
    graph.insert_before(old_nodes[0], new_nodes)
    new_out.type = old_out.type if old_out.type is not None else new_out.type
    new_out.shape = old_out.shape if old_out.shape is not None else new_out.shape
    name = old_out.name
    ir.convenience.replace_all_uses_with(old_out, new_out, replace_graph_outputs=True)
    graph.remove(list(old_nodes), safe=True)
    old_out.name = None
    new_out.name = name


def per_channel(k: np.ndarray, rank: int | None, axis: int, channels: int) -> np.ndarray | None:
    """``k`` as a length-``channels`` vector if it broadcasts onto a rank-``rank`` tensor along ``axis``
    only (a scalar counts), without growing the tensor's rank; None otherwise.

    ``axis`` may be negative (``-1`` for a MatMul's feature axis); ``rank`` None means unknown, in which
    case only scalars and, for ``axis=-1``, 1-D tensors are accepted.
    """
    k = np.asarray(k)
    if k.size == 1 and (rank is None or k.ndim <= rank):
        return np.full(channels, float(k.reshape(())), dtype=np.float64)
    if rank is None:
        if axis == -1 and k.ndim == 1 and k.shape[0] == channels:
            return k.astype(np.float64)
        return None
    if k.ndim > rank:
        return None
    shape = (1,) * (rank - k.ndim) + tuple(k.shape)
    pos = axis % rank
    for i, dim in enumerate(shape):
        if i != pos and dim != 1:
            return None
    if shape[pos] not in (1, channels):
        return None
    return np.broadcast_to(k.reshape(-1).astype(np.float64), (channels,)).copy()


def declared_opset(model: ir.Model) -> int | None:
    """The default-domain opset the model imports (``""`` or ``"ai.onnx"``), None when it imports none.

    The one reader of a model's opset: passes, the opset raiser and the report all go through it.
    """
    imports = model.opset_imports
    version = imports.get("", imports.get("ai.onnx"))
    return None if version is None else int(version)


def opset_of(model: ir.Model) -> int:
    """:func:`declared_opset`, counting a model without a default-domain import as opset 1."""
    return declared_opset(model) or 1


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
        for graph in all_graphs(model):
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


def swap_chain(
    graph: ir.Graph,
    names: Names,
    chain: Sequence[ir.Node],
    new: ir.Node,
    output: ir.Value,
    *,
    owner: ir.Node,
    dtype: ir.DataType,
    base: str,
) -> None:
    """Replace the matched ``chain`` that computes ``output`` by the one node ``new``.

    ``new`` takes the chain's module path (preferring ``owner``'s), the old output's dtype and shape, and is
    inserted right after the output's producer: every replaced node is an ancestor of ``output``, so all of
    ``new``'s inputs are already computed there. The chain and whatever only it kept alive are removed.
    """
    set_module_path(new, owner_path(chain, owner))
    new.outputs[0].dtype = dtype
    new.outputs[0].shape = output.shape
    producer = output.producer()
    if producer is None:
        raise ValueError(f"value {output.name!r} has no producer; a matched chain always ends in a node")
    graph.insert_after(producer, new)
    replace_output(names, output, new.outputs[0], base)
    remove_dead(graph, reversed(chain))


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


def value_uses(value: ir.Value) -> list[Usage]:
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


def all_graphs(model: ir.Model) -> Iterator[ir.Graph]:
    """The main graph, its If/Loop/Scan bodies, then every model-local function body and its subgraphs."""
    yield from model.graphs()
    for function in model.functions.values():
        yield function.graph
        yield from function.graph.subgraphs()
