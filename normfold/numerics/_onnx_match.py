"""ONNX side of the per-layer comparison: which value of the graph carries each module call's output.

See :mod:`normfold.numerics.layers` for the matching rules (provenance groups, absorbers, nodeless
modules).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx

from normfold.exporter.provenance import is_ancestor, module_prefixes, resolve_node_path
from normfold.numerics._eager_trace import EagerTrace, _Call
from normfold.numerics.functional import match_functional
from normfold.numerics.layer_report import (
    _ROOT_LABEL,
    REASON_CALLS,
    REASON_INLINED,
    REASON_NO_COUNTERPART,
    REASON_NON_TENSOR,
    REASON_SHAPE,
    LayerStatus,
)


def _parent(path: str) -> str | None:
    if path == "":
        return None
    return path.rsplit(".", 1)[0] if "." in path else ""


def _dims(info: onnx.ValueInfoProto) -> tuple[int | None, ...] | None:
    tensor = info.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)


class _Graph:
    """Index of the top-level nodes of an ONNX graph: module paths, producers, consumers, known shapes.

    Values are referred to by name. It reads the protobuf directly: building an onnx_ir model only to
    read names and shapes costs more than the whole instrumented run on small models.
    """

    def __init__(self, graph: onnx.GraphProto, modules: frozenset[str] = frozenset()) -> None:
        self.nodes: list[onnx.NodeProto] = list(graph.node)
        self.paths = [resolve_node_path(n, modules) for n in self.nodes]
        self.by_module: dict[str, list[int]] = {}
        for i, p in enumerate(self.paths):
            if p is None:
                continue
            for prefix in module_prefixes(p):
                self.by_module.setdefault(prefix, []).append(i)
        self._producer: dict[str, int] = {}
        self._consumers: dict[str, list[int]] = {}
        for i, node in enumerate(self.nodes):
            for name in node.output:
                if name:
                    self._producer[name] = i
            for name in dict.fromkeys(node.input):
                if name:
                    self._consumers.setdefault(name, []).append(i)
        initializers = {t.name for t in graph.initializer}
        self.graph_inputs = [v.name for v in graph.input if v.name not in initializers]
        self.graph_outputs = [v.name for v in graph.output]
        self._shapes: dict[str, tuple[int | None, ...] | None] = {}
        self.infos: dict[str, onnx.ValueInfoProto] = {}
        for info in (*graph.input, *graph.value_info, *graph.output):
            self.infos.setdefault(info.name, info)

    def producer(self, value: str) -> int | None:
        return self._producer.get(value)

    def producer_node(self, value: str) -> onnx.NodeProto | None:
        i = self._producer.get(value)
        return None if i is None else self.nodes[i]

    def consumers(self, value: str) -> list[int]:
        return self._consumers.get(value, [])

    def shape(self, value: str) -> tuple[int | None, ...] | None:
        if value not in self._shapes:
            info = self.infos.get(value)
            self._shapes[value] = None if info is None else _dims(info)
        return self._shapes[value]

    def elem_type(self, value: str) -> int:
        info = self.infos.get(value)
        return 0 if info is None else info.type.tensor_type.elem_type

    def fits(self, value: str, shape: tuple[int, ...]) -> bool | None:
        """True/False when the value's shape is known enough to say, None when it is unknown."""
        static = self.shape(value)
        if static is None:
            return None
        if len(static) != len(shape):
            return False
        return all(d is None or d == s for d, s in zip(static, shape, strict=True))

    def groups(self, path: str) -> list[list[int]]:
        """The nodes of ``path``'s subtree split into connected groups (one per call), in order."""
        members = self.by_module.get(path, [])
        if not members:
            return []
        parent = {i: i for i in members}

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for i in members:
            for inp in self.nodes[i].input:
                j = self._producer.get(inp) if inp else None
                if j is not None and j in parent:
                    parent[find(i)] = find(j)
        comps: dict[int, list[int]] = {}
        for i in members:
            comps.setdefault(find(i), []).append(i)
        return sorted((sorted(c) for c in comps.values()), key=lambda c: c[0])

    def boundary(self, group: list[int]) -> list[str]:
        """Values produced inside ``group`` that leave it (consumed outside or graph outputs), in order."""
        inside = set(group)
        outputs = set(self.graph_outputs)
        found: list[str] = []
        for i in group:
            for v in self.nodes[i].output:
                if v and (v in outputs or any(c not in inside for c in self.consumers(v))):
                    found.append(v)
        return found


@dataclass
class _Match:
    """Where one layer's reference is found: an ONNX value (compared) or why there is none."""

    value: str | None = None
    status: LayerStatus = "unmatched"
    reason: str = ""
    reason_kind: str = ""
    fused_into: str | None = None
    alias_of: str = ""


def _pick_value(g: _Graph, group: list[int], shape: tuple[int, ...]) -> tuple[str | None, str]:
    """The last node's first output if its shape fits, else the last boundary value that fits."""
    last = g.nodes[group[-1]]
    first = last.output[0] if last.output else ""
    if first and g.fits(first, shape) is not False:
        return first, ""
    for v in reversed(g.boundary(group)):
        if g.fits(v, shape) is True:
            return v, ""
    got = g.shape(first) if first else None
    shown = "?" if got is None else "x".join("?" if d is None else str(d) for d in got)
    return None, (
        f"{REASON_SHAPE}: the last node {last.name!r} ({last.op_type}) gives {shown}, eager gives "
        f"{'x'.join(map(str, shape))}, and no value leaving the module has the eager shape"
    )


def _match_calls(g: _Graph, calls: list[_Call]) -> dict[tuple[int, int], _Match]:
    """Assign an ONNX value (or a reason) to every (call, output) whose module owns nodes."""
    by_path: dict[str, list[_Call]] = {}
    for c in calls:
        by_path.setdefault(c.path, []).append(c)
    result: dict[tuple[int, int], _Match] = {}
    for path, path_calls in by_path.items():
        if path == "":
            continue  # the root is matched on the graph outputs
        groups = g.groups(path)
        if not groups:
            continue
        if len(groups) == len(path_calls):
            pairs = list(zip(path_calls, groups, strict=True))
        elif len(path_calls) == 1:
            pairs = [(path_calls[0], sorted(i for grp in groups for i in grp))]
        else:
            # The calls cannot be told apart; only the last call's output (the last node) is certain.
            pairs = [(path_calls[-1], sorted(i for grp in groups for i in grp))]
            for c in path_calls[:-1]:
                for j in range(len(c.outputs)):
                    result[(c.order, j)] = _Match(
                        reason=(
                            f"{REASON_CALLS}: {path} runs {len(path_calls)} times in eager but its nodes form "
                            f"{len(groups)} connected groups in the ONNX graph; only its last call is compared"
                        ),
                        reason_kind=REASON_CALLS,
                    )
        for c, group in pairs:
            tensor_outputs = [(j, o) for j, o in enumerate(c.outputs) if o is not None]
            if len(tensor_outputs) == 1:
                j, ref = tensor_outputs[0]
                value, why = _pick_value(g, group, tuple(ref.shape))
                result[(c.order, j)] = (
                    _Match(value=value, status="pass")
                    if value is not None
                    else _Match(reason=why, reason_kind=REASON_SHAPE)
                )
                continue
            leaving = g.boundary(group)
            used: set[str] = set()
            for j, ref in tensor_outputs:
                fits = [v for v in leaving if v not in used and g.fits(v, tuple(ref.shape)) is not False]
                if fits:
                    used.add(fits[0])
                    result[(c.order, j)] = _Match(value=fits[0], status="pass")
                else:
                    result[(c.order, j)] = _Match(
                        reason=f"{REASON_SHAPE}: no value leaving {path} has shape {'x'.join(map(str, ref.shape))}",
                        reason_kind=REASON_SHAPE,
                    )
    return result


def _source_call(
    tensor_id: int, calls: list[_Call], producer: dict[int, tuple[int, int]], before: int
) -> tuple[int, int] | None:
    """The (call, output) that returned this tensor before call ``before``.

    The latest producer can be the asking call itself (an in-place ReLU returns its input), so then the
    earlier calls are searched.
    """
    src = producer.get(tensor_id)
    if src is not None and src[0] < before:
        return src
    for c in reversed(calls[:before]):
        if tensor_id in c.output_ids:
            return c.order, c.output_ids.index(tensor_id)
    return None


def _value_of_tensor(
    tensor_id: int,
    calls: list[_Call],
    producer: dict[int, tuple[int, int]],
    input_ids: list[int],
    g: _Graph,
    matches: dict[tuple[int, int], _Match],
    before: int,
    tracked: dict[int, str] | None = None,
) -> str | None:
    """The ONNX value carrying an eager tensor: a graph input or the matched output of an earlier call."""
    if tensor_id in input_ids:
        i = input_ids.index(tensor_id)
        return g.graph_inputs[i] if i < len(g.graph_inputs) else None
    src = _source_call(tensor_id, calls, producer, before)
    m = None if src is None else matches.get(src)
    if m is not None and m.value is not None:
        return m.value
    return (tracked or {}).get(tensor_id)  # the output of a matched functional op


def _absorber(
    g: _Graph, path: str, inputs: list[str], last_call: dict[str, int], order: int
) -> tuple[str, onnx.NodeProto] | None:
    """The module (and node) that took over ``path``'s computation: a consumer of its inputs.

    Preference: a later sibling (Conv → BN), then a descendant of a later sibling, then an ancestor.
    ``last_call[p]`` is the order of ``p``'s last call; "later" means after call ``order``.
    """
    parent = _parent(path)
    best: tuple[int, int, str, onnx.NodeProto] | None = None
    for value in inputs:
        for i in g.consumers(value):
            owner = g.paths[i]
            if owner is None or owner == path or owner.startswith(path + "."):
                continue
            sibling = _child_towards(parent, owner) if parent is not None else None
            if sibling is not None and last_call.get(sibling, -1) > order:
                rank = 0 if sibling == owner else 1
            elif is_ancestor(owner, path):
                rank = 2
            else:
                continue
            key = (rank, i)
            if best is None or key < best[:2]:
                best = (rank, i, owner, g.nodes[i])
    return None if best is None else (best[2], best[3])


def _child_towards(parent: str, path: str) -> str | None:
    """The child of ``parent`` on the way down to ``path`` (``path`` itself for a direct child)."""
    if not is_ancestor(parent, path):
        return None
    rest = path[len(parent) + 1 :] if parent else path
    head = rest.split(".", 1)[0]
    return f"{parent}.{head}" if parent else head


def _resolve_nodeless(
    g: _Graph,
    calls: list[_Call],
    producer: dict[int, tuple[int, int]],
    input_ids: list[int],
    matches: dict[tuple[int, int], _Match],
    tracked: dict[int, str] | None = None,
) -> None:
    """Give a match or a reason to every (call, output) of a module that owns no ONNX node.

    ``tracked`` maps tensor ids of matched functional-op outputs to their ONNX values, so a Dropout or
    Identity fed by ``F.gelu(x)`` is compared at the Gelu's value instead of "untracked ops"."""
    last_call = {c.path: c.order for c in calls}
    for c in calls:
        for j, out in enumerate(c.outputs):
            key = (c.order, j)
            if key in matches:
                continue
            if out is None:
                matches[key] = _Match(
                    reason=f"{REASON_NON_TENSOR} (returns no tensor here)", reason_kind=REASON_NON_TENSOR
                )
                continue
            if c.path == "":
                continue  # handled by the root match
            if c.returns_input:
                value = _value_of_tensor(c.output_ids[j], calls, producer, input_ids, g, matches, c.order, tracked)
                if value is not None:
                    matches[key] = _Match(value=value, status="pass", alias_of=value)
                    continue
            inputs = [
                v
                for v in (
                    _value_of_tensor(t, calls, producer, input_ids, g, matches, c.order, tracked) for t in c.input_ids
                )
                if v is not None
            ]
            found = _absorber(g, c.path, inputs, last_call, c.order) if inputs else None
            if found is None:
                feeder = next(
                    (src for src in (_source_call(t, calls, producer, c.order) for t in c.input_ids) if src), None
                )
                untracked = (
                    f"its input comes from {calls[feeder[0]].path or _ROOT_LABEL}, which has no ONNX value of its own"
                    if feeder is not None
                    else "its inputs come from untracked ops"
                )
                why = (
                    "its nodes are not in the graph and no later sibling or parent consumes its inputs"
                    if inputs
                    else f"its nodes are not in the graph and {untracked}"
                )
                matches[key] = _Match(reason=f"{REASON_NO_COUNTERPART}: {why}", reason_kind=REASON_NO_COUNTERPART)
                continue
            owner, node = found
            if is_ancestor(owner, c.path):
                matches[key] = _Match(
                    reason=f"{REASON_INLINED}: {node.op_type} {node.name!r} of {owner or _ROOT_LABEL}",
                    reason_kind=REASON_INLINED,
                    fused_into=owner,
                )
            else:
                matches[key] = _Match(status="fused", fused_into=owner, reason=f"{node.op_type} {node.name!r}")


def _agree_with_children(
    calls: list[_Call], producer: dict[int, tuple[int, int]], matches: dict[tuple[int, int], _Match]
) -> None:
    """Provenance checked from the eager side: a module that returns a tensor one of its descendants
    returned must be compared at that descendant's value, or not at all.

    The graph side alone picks "the last node under the module's path", which is a wrong value when
    the exporter lost or misplaced the provenance of the nodes that really end the module (a
    TorchScript mobilenet_v3 block compared its squeeze-excitation Mul, error 7.4, as its output). The
    eager trace knows which call produced each tensor, so the parent follows its child: the same value
    when the child is matched, "not matched" with the child's reason when it is not. A child inlined
    into a fused op of this very parent leaves the parent's own match alone (that op computes both).
    """
    for c in calls:
        if c.path == "":
            continue
        for j, tensor_id in enumerate(c.output_ids):
            key = (c.order, j)
            if tensor_id == 0 or key not in matches or c.returns_input:
                continue
            src = _source_call(tensor_id, calls, producer, c.order)
            if src is None or not is_ancestor(c.path, calls[src[0]].path):
                continue
            mine_ref, child_ref = c.outputs[j], calls[src[0]].outputs[src[1]]
            if mine_ref is None or child_ref is None or not np.array_equal(mine_ref, child_ref, equal_nan=True):
                continue  # the same tensor object, changed in place afterwards (``out += identity``)
            child, mine = matches.get(src), matches[key]
            if child is None:
                continue
            if child.value is not None:
                if mine.value != child.value:
                    matches[key] = dataclasses.replace(child, alias_of="")
                continue
            if (
                child.reason_kind == REASON_INLINED
                and child.fused_into is not None
                and (child.fused_into == c.path or is_ancestor(child.fused_into, c.path))
            ):
                continue
            if child.status == "fused":
                continue
            name = calls[src[0]].path
            matches[key] = _Match(
                reason=f"its output is {name}'s, which is not matched ({child.reason_kind or child.reason})",
                reason_kind=child.reason_kind or REASON_NO_COUNTERPART,
            )


def _match_all(g: _Graph, trace: EagerTrace) -> tuple[dict[tuple[int, int], _Match], dict[int, str]]:
    """Every module call's value (by provenance, then nodeless resolution, then the root against the
    graph outputs) and every functional call's value (by functional call index)."""
    calls, producer, input_ids = trace.calls, trace.producer, trace.input_ids
    matches = _match_calls(g, calls)
    fvalues = match_functional(trace.functional, g.nodes, g.paths, g.fits)
    tracked = {trace.functional[k].output_id: value for k, value in fvalues.items()}
    _resolve_nodeless(g, calls, producer, input_ids, matches, tracked)
    _agree_with_children(calls, producer, matches)
    _match_root(g, calls, matches)
    return matches, fvalues


def _match_root(g: _Graph, calls: list[_Call], matches: dict[tuple[int, int], _Match]) -> None:
    """The root module's tensors are the graph outputs, by position, when their counts agree."""
    root_outputs = list(g.graph_outputs)
    for c in calls:
        if c.path != "":
            continue
        tensor_js = [j for j, o in enumerate(c.outputs) if o is not None]
        for k, j in enumerate(tensor_js):
            if len(tensor_js) == len(root_outputs):
                matches[(c.order, j)] = _Match(value=root_outputs[k], status="pass")
            else:
                matches[(c.order, j)] = _Match(
                    reason=f"{REASON_NO_COUNTERPART}: the graph has {len(root_outputs)} outputs, eager "
                    f"returned {len(tensor_js)} tensors",
                    reason_kind=REASON_NO_COUNTERPART,
                )
