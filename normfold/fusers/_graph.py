"""Small onnx_ir helpers shared by the folding passes: constants, attributes, initializers, node swaps.

Nothing here mutates an existing initializer. The exporters deduplicate equal tensors (a fresh BN's
running_mean may be the very initializer that is its bias, NORMS.md §2), so folds always write *new*
initializers and leave the old ones to the unused-node cleanup.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir

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


def new_initializer(graph: ir.Graph, array: np.ndarray, base: str | None) -> ir.Value:
    """Register ``array`` as a fresh initializer with a unique name derived from ``base``."""
    stem = f"{base or 'folded'}_nf"
    index = 0
    while f"{stem}{index}" in graph.initializers:
        index += 1
    name = f"{stem}{index}"
    tensor = ir.Tensor(np.ascontiguousarray(array), name=name)  # ir.tensor()'s protocol checks cost ~2 ms
    value = ir.Value(name=name, const_value=tensor, type=ir.TensorType(tensor.dtype), shape=tensor.shape)
    graph.register_initializer(value)
    return value


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
