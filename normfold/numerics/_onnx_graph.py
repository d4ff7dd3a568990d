"""Index of an ONNX graph for the per-layer match: module paths, producers, consumers, static shapes."""

from __future__ import annotations

import onnx

from normfold.exporter.provenance import module_prefixes, resolve_node_path


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
