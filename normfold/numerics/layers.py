"""Per-layer numerics: every ``nn.Module`` output against the ONNX value that carries it.

Eager side
    A forward hook on every module records each call's output (tuple/list/dict outputs flattened in
    torch.onnx order) in the order the calls *finish*, under ``torch.inference_mode`` on deep copies of
    the inputs. Tensors are cloned in the hook, so an in-place op later in the model (``ReLU(inplace)``)
    cannot rewrite what was recorded. The identity of every tensor is kept during the run, which tells
    which earlier layer (or graph input) fed each call.

ONNX side
    Provenance (:func:`normfold.exporter.provenance.module_path`) names the module of every node. The
    value carrying a module's output is the first output of the **last** node (topological order) whose
    path is the module or one of its descendants; its static shape must agree with the hooked tensor
    (otherwise a later value of the same module that leaves it and has the right shape is taken, and
    failing that the layer is "shape mismatch"). A module called ``k`` times (a shared ``ReLU``) owns
    ``k`` connected groups of nodes, matched to its calls in order. In an optimized graph a Conv that
    absorbed a BatchNorm points at the BN module, so the conv module owns no node: when a node of a
    later sibling consumes the conv's input, the conv is *fused into* that sibling (which is still
    compared, so the fused computation is checked); when it belongs to an ancestor the module is
    *inlined into a fused op*. Every other module without a value is listed with the reason.

    The matched values become extra graph outputs of a **copy** of the model and the backend runs
    **once** for all layers. Only module-boundary values are exposed, so the fusions normfold put in the
    file are untouched. A runtime may still decline one of its *own* fusions across an exposed value
    (ORT's Conv+Relu → FusedConv); that changes which kernel runs, not what the graph computes.

Tolerance along depth
    A layer passes when ``|a-b| <= atol_eff + rtol·|b|`` element-wise (plus the precision's cosine floor)
    with ``atol_eff = atol + rtol·max|ref_layer|`` (:func:`layer_tolerance`). Why the magnitude, not a
    depth factor: the rounding error of a correct graph is relative to the size of the values being
    summed, not to each element: an element that cancels to ~0 inside a layer whose values reach 50
    carries the absolute error of a 50, and the plain ``atol`` (meant for outputs of order 1) would flag
    it. Measured on the zoo at fp32 on ORT CPU (benchmarks/per_layer_cost.py prints it), a correct
    graph (exported or optimized) stays at or below 3.3e-6·max|ref| in every layer, with no trend along
    depth, while a 1 % weight fault moves the faulty layer by ~1e-2·max|ref|. ``rtol·max|ref| =
    1e-4·max|ref|`` sits between the two: ≥ 30x above the noise, ~100x below the fault. A ``sqrt(depth)`` factor was not
    needed at these depths and would only blunt detection in deep layers. Every layer's effective
    tolerance is in the report. (The graph outputs are also checked at the plain tolerance by
    :func:`normfold.numerics.compare`, as before.)

Exporter quirks
    Paths from the TorchScript exporter (``relu_1`` for a second call, child scopes relative to an
    ancestor) are mapped onto the model's real module paths, and a Conv+BN it folded, which keeps the
    *conv's* name, is credited to the BN when its value matches the BN's output (see
    :func:`_credit_exporter_fusions`).

First divergence
    The first layer in execution order that fails. Hooks fire when a call finishes, so children come
    before their parent and the innermost module that went wrong is named, not the block around it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch
from torch import nn

from normfold.errors import InputSpecError, OnnxLoadError
from normfold.exporter.provenance import is_ancestor, module_prefixes, resolve_node_path
from normfold.io import save_onnx
from normfold.numerics.functional import FunctionalCall, match_functional, record_functional
from normfold.numerics.metrics import TensorMetrics, compare_tensors
from normfold.numerics.tolerances import Tolerance
from normfold.onnx_files import PROTOBUF_LIMIT, data_file_name, has_external_data, read_graph
from normfold.runtime.base import Backend, SessionOptions

log = logging.getLogger(__name__)

__all__ = [
    "EagerTrace",
    "FirstDivergence",
    "LayerReport",
    "LayerResult",
    "LayerStatus",
    "compare_layers",
    "layer_tolerance",
    "max_magnitude",
    "trace_eager",
]

LayerStatus = Literal["pass", "fail", "fused", "unmatched"]

#: Reasons an executed layer has no compared value (JSON ``reason_kind``).
REASON_NO_COUNTERPART = "no ONNX counterpart"
REASON_INLINED = "inlined into a fused op"
REASON_NON_TENSOR = "non-tensor output"
REASON_SHAPE = "shape mismatch"
REASON_NOT_CALLED = "never called"
REASON_CALLS = "calls not separable"

_ROOT_LABEL = "<root>"


def max_magnitude(reference: np.ndarray) -> float:
    """``max|ref|`` over the finite elements (0 for empty or non-numeric tensors)."""
    ref = np.asarray(reference)
    if not ref.size or not np.issubdtype(ref.dtype, np.number) or ref.dtype == np.bool_:
        return 0.0
    magnitude = float(np.abs(ref).max())
    if np.isfinite(magnitude):
        return magnitude
    finite = np.abs(ref[np.isfinite(ref)])
    return float(finite.max()) if finite.size else 0.0


def layer_tolerance(tol: Tolerance, reference: np.ndarray | float) -> Tolerance:
    """The tolerance of one layer: ``atol + rtol·max|ref_layer|`` absolute, ``rtol`` relative (see module doc).

    ``reference`` is the eager tensor of the layer, or already its ``max|ref|``.
    """
    magnitude = float(reference) if isinstance(reference, (float, int)) else max_magnitude(reference)
    return dataclasses.replace(tol, atol=tol.atol + tol.rtol * magnitude)


@dataclass
class LayerResult:
    """One output of one module call, and how its ONNX counterpart compares with it."""

    name: str
    module: str
    module_type: str
    call: int
    output_index: int
    order: int
    depth: int
    status: LayerStatus
    reason: str = ""
    reason_kind: str = ""
    fused_into: str | None = None
    onnx_node: str | None = None
    onnx_value: str | None = None
    op_type: str | None = None
    shape: tuple[int, ...] = ()
    tolerance: Tolerance | None = None
    metrics: TensorMetrics | None = None
    ref_max_abs: float | None = None
    inputs_from: list[str] = field(default_factory=list)
    absorbed: list[str] = field(default_factory=list)
    kind: Literal["module", "functional"] = "module"

    @property
    def matched(self) -> bool:
        return self.status in ("pass", "fail")

    @property
    def max_abs(self) -> float | None:
        return None if self.metrics is None else self.metrics.max_abs

    @property
    def max_rel(self) -> float | None:
        return None if self.metrics is None else self.metrics.max_rel

    @property
    def status_text(self) -> str:
        """``pass``, ``FAIL``, ``fused into X`` or ``not matched: reason``, as the report prints it."""
        if self.status == "pass":
            return "pass"
        if self.status == "fail":
            return "FAIL"
        if self.status == "fused":
            return f"fused into {self.fused_into or _ROOT_LABEL}"
        return f"not matched: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "module": self.module,
            "module_type": self.module_type,
            "call": self.call,
            "output_index": self.output_index,
            "order": self.order,
            "depth": self.depth,
            "status": self.status,
            "reason": self.reason,
            "reason_kind": self.reason_kind,
            "fused_into": self.fused_into,
            "onnx_node": self.onnx_node,
            "onnx_value": self.onnx_value,
            "op_type": self.op_type,
            "shape": list(self.shape),
            "tolerance": None if self.tolerance is None else self.tolerance.to_dict(),
            "metrics": None if self.metrics is None else self.metrics.to_dict(),
            "ref_max_abs": self.ref_max_abs,
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "inputs_from": list(self.inputs_from),
            "absorbed": list(self.absorbed),
            "kind": self.kind,
        }


@dataclass(frozen=True)
class FirstDivergence:
    """The first failing layer in execution order, with a one-line explanation."""

    module: str
    name: str
    onnx_node: str | None
    onnx_value: str | None
    op_type: str | None
    max_abs: float
    max_rel: float
    mismatch_fraction: float
    atol: float
    rtol: float
    order: int
    explanation: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "name": self.name,
            "onnx_node": self.onnx_node,
            "onnx_value": self.onnx_value,
            "op_type": self.op_type,
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "mismatch_fraction": self.mismatch_fraction,
            "atol": self.atol,
            "rtol": self.rtol,
            "order": self.order,
            "explanation": self.explanation,
        }


@dataclass
class LayerReport:
    """Every module call of one backend run against eager, in execution order."""

    backend: str
    onnx_path: str
    tolerance: Tolerance
    layers: list[LayerResult] = field(default_factory=list)
    extra_outputs: int = 0
    tolerance_rule: str = "atol_eff = atol + rtol·max|ref_layer|, rtol as given"
    #: The graph outputs of the same (instrumented) run, by name: the output comparison reuses them.
    outputs: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    functional_calls: int = 0
    functional_matched: int = 0

    @property
    def first_divergence(self) -> FirstDivergence | None:
        for layer in self.layers:
            if layer.status == "fail":
                return _first_divergence(layer, self.layers)
        return None

    @property
    def passed(self) -> bool:
        return all(layer.status != "fail" for layer in self.layers)

    @property
    def counts(self) -> dict[str, int]:
        """Module rows by status (the matching quality), and the functional rows beside them."""
        statuses = [layer.status for layer in self.layers if layer.kind == "module"]
        functional = [layer.status for layer in self.layers if layer.kind == "functional"]
        return {
            "layers": len(statuses),
            "matched": sum(s in ("pass", "fail") for s in statuses),
            "passed": statuses.count("pass"),
            "failed": statuses.count("fail"),
            "fused": statuses.count("fused"),
            "unmatched": statuses.count("unmatched"),
            "functional": len(functional),
            "functional_failed": functional.count("fail"),
        }

    def to_dict(self) -> dict[str, Any]:
        first = self.first_divergence
        return {
            "backend": self.backend,
            "onnx_path": self.onnx_path,
            "passed": self.passed,
            "tolerance": self.tolerance.to_dict(),
            "tolerance_rule": self.tolerance_rule,
            "extra_outputs": self.extra_outputs,
            "counts": self.counts,
            "functional": {"calls": self.functional_calls, "matched": self.functional_matched},
            "first_divergence": None if first is None else first.to_dict(),
            "layers": [layer.to_dict() for layer in self.layers],
        }


# --------------------------------------------------------------------------------------------------------
# Eager side


@dataclass
class _Call:
    """One finished call of one module, as the forward hook saw it."""

    path: str
    module_type: str
    call: int
    order: int
    outputs: list[np.ndarray | None]
    output_ids: list[int]
    input_ids: list[int]
    returns_input: bool


def _flatten(obj: Any) -> list[Any]:
    """Flatten like :func:`normfold.runtime.eager.flatten_outputs`, keeping non-tensor leaves as None."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _flatten(item)]
    if isinstance(obj, dict):
        return [t for key in obj for t in _flatten(obj[key])]
    return [None]


def _tensors(obj: Any) -> list[torch.Tensor]:
    return [t for t in _flatten(obj) if isinstance(t, torch.Tensor)]


@dataclass
class EagerTrace:
    """One hooked eager run: every module call's outputs, and where each call's inputs came from.

    ``outputs`` are the model's own flattened outputs (what :func:`normfold.runtime.eager.run_eager`
    returns), so :func:`normfold.numerics.compare` uses one trace both as the output reference and for
    every backend's per-layer comparison: one eager run in all.
    """

    calls: list[_Call]
    producer: dict[int, tuple[int, int]]
    input_ids: list[int]
    never_called: list[str]
    modules: frozenset[str] = frozenset()
    #: Functional ops called in user forwards (:mod:`normfold.numerics.functional`), in execution order.
    functional: list[FunctionalCall] = field(default_factory=list)

    @property
    def outputs(self) -> list[np.ndarray]:
        root = next((c for c in reversed(self.calls) if c.path == ""), None)
        return [] if root is None else [o for o in root.outputs if o is not None]


def trace_eager(module: nn.Module, inputs: Sequence[torch.Tensor]) -> EagerTrace:
    """Run ``module`` once under ``torch.inference_mode`` on deep copies of ``inputs``, a hook on every module.

    Calls are recorded in finishing order with their outputs cloned; ``producer`` maps ``id(tensor)`` to
    the latest (call, output) that returned it.
    """
    calls: list[_Call] = []
    producer: dict[int, tuple[int, int]] = {}
    keep_alive: list[torch.Tensor] = []
    counts: dict[str, int] = {}
    named = list(module.named_modules())
    paths = {id(sub): path for path, sub in named}

    def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        path = paths.get(id(mod))
        if path is None:  # a module of another model (the hook is global while it is installed)
            return
        flat = _flatten(output)
        arg_tensors = _tensors(args) + _tensors(kwargs) if kwargs else _tensors(args)
        index = len(calls)
        outputs: list[np.ndarray | None] = []
        output_ids: list[int] = []
        for j, t in enumerate(flat):
            if isinstance(t, torch.Tensor):
                keep_alive.append(t)
                outputs.append(t.detach().clone().cpu().numpy())
                output_ids.append(id(t))
                producer[id(t)] = (index, j)
            else:
                outputs.append(None)
                output_ids.append(0)
        calls.append(
            _Call(
                path=path,
                module_type=type(mod).__name__,
                call=counts.get(path, 0),
                order=index,
                outputs=outputs,
                output_ids=output_ids,
                input_ids=[id(t) for t in arg_tensors],
                returns_input=bool(flat)
                and all(isinstance(t, torch.Tensor) and any(t is a for a in arg_tensors) for t in flat),
            )
        )
        counts[path] = counts.get(path, 0) + 1

    args = copy.deepcopy(tuple(inputs))
    input_ids = [id(t) for t in args]
    # One global hook instead of one per module: same calls, a fraction of the registration and dispatch cost.
    handle = torch.nn.modules.module.register_module_forward_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode(), record_functional(paths, lambda: len(calls)) as functional:
            module(*args)
    finally:
        handle.remove()
    keep_alive.clear()
    never = [path for path, _ in named if path not in counts]
    return EagerTrace(calls, producer, input_ids, never, frozenset(path for path, _ in named), functional)


# --------------------------------------------------------------------------------------------------------
# ONNX side


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


# --------------------------------------------------------------------------------------------------------
# The comparison


def _display_name(c: _Call, j: int, n_calls: dict[str, int]) -> str:
    name = c.path or _ROOT_LABEL
    if n_calls.get(c.path, 1) > 1:
        name += f"#{c.call + 1}"
    if len(c.outputs) > 1:
        name += f"[{j}]"
    return name


def _depth(path: str) -> int:
    return 0 if path == "" else path.count(".") + 1


def compare_layers(
    module: nn.Module,
    inputs: Sequence[torch.Tensor],
    onnx_path: str | Path,
    backend: Backend,
    options: SessionOptions | None,
    tol: Tolerance,
    trace: EagerTrace | None = None,
) -> LayerReport:
    """Diff every module's output in eager against its ONNX value on ``backend``, run once for all.

    ``inputs`` are fed to both sides (the ONNX inputs by position). ``trace`` reuses a hooked eager run
    of the same module on the same inputs (:func:`trace_eager`); without it one is made. Returns a
    :class:`LayerReport` with every module call in execution order, its status and metrics, and the
    first divergence.
    """
    if trace is None:
        trace = trace_eager(module.eval(), inputs)
    calls, producer, input_ids, never = trace.calls, trace.producer, trace.input_ids, trace.never_called
    proto = _load_proto(onnx_path)
    g = _Graph(proto.graph, trace.modules)
    if len(g.graph_inputs) != len(inputs):
        raise InputSpecError(
            f"the ONNX model takes {len(g.graph_inputs)} inputs {g.graph_inputs}, the eager model {len(inputs)}"
        )
    matches = _match_calls(g, calls)
    fvalues = match_functional(trace.functional, g.nodes, g.paths, g.fits)
    tracked = {trace.functional[k].output_id: value for k, value in fvalues.items()}
    _resolve_nodeless(g, calls, producer, input_ids, matches, tracked)
    _agree_with_children(calls, producer, matches)
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

    wanted: dict[str, np.ndarray] = {}
    for (order, j), m in matches.items():
        ref = calls[order].outputs[j]
        if m.value is not None and ref is not None:
            wanted[m.value] = ref
    for k, value in fvalues.items():
        wanted.setdefault(value, trace.functional[k].output)
    produced, extra = _run_instrumented(proto, g, wanted, inputs, backend, options, Path(onnx_path))
    report = LayerReport(backend=backend.name, onnx_path=str(onnx_path), tolerance=tol, extra_outputs=extra)
    report.outputs = {name: produced[name] for name in g.graph_outputs if name in produced}
    report.functional_calls, report.functional_matched = len(trace.functional), len(fvalues)
    fnames = {call.output_id: call.name for call in trace.functional}
    n_calls: dict[str, int] = {}
    for c in calls:
        n_calls[c.path] = n_calls.get(c.path, 0) + 1
    names = {(c.order, j): _display_name(c, j, n_calls) for c in calls for j in range(len(c.outputs))}
    functional = _functional_layers(trace, fvalues, produced, tol, g)
    for rows in functional.values():
        for row, call in rows:
            pseudo = _Call("", "", 0, call.after_call, [], [], call.input_ids, False)
            row.inputs_from = _input_sources(pseudo, calls, producer, input_ids, names, g, fnames)
    absorbed: dict[str, list[str]] = {}
    for (order, j), m in sorted(matches.items()):
        if m.status == "fused" and m.fused_into is not None:
            absorbed.setdefault(m.fused_into, []).append(names[(order, j)])
    seen: dict[str, list[tuple[np.ndarray, LayerResult]]] = {}
    for c in calls:
        report.layers.extend(row for row, _ in functional.pop(c.order, []))
        sources = _input_sources(c, calls, producer, input_ids, names, g, fnames)
        for j, ref in enumerate(c.outputs):
            m = matches.get((c.order, j), _Match(reason=REASON_NO_COUNTERPART, reason_kind=REASON_NO_COUNTERPART))
            layer = LayerResult(
                name=names[(c.order, j)],
                module=c.path,
                module_type=c.module_type,
                call=c.call,
                output_index=j,
                order=c.order,
                depth=_depth(c.path),
                status=m.status,
                reason=m.reason,
                reason_kind=m.reason_kind,
                fused_into=m.fused_into,
                shape=tuple(ref.shape) if ref is not None else (),
                inputs_from=sources,
                absorbed=list(absorbed.get(c.path, [])),
            )
            if m.value is not None and ref is not None:
                _fill_metrics(layer, m, ref, produced, tol, g, seen)
            report.layers.append(layer)
    for rest in functional.values():
        report.layers.extend(row for row, _ in rest)
    _credit_exporter_fusions(report.layers, calls, produced, tol)
    _follow_credited(report.layers)
    for path in never:
        sub = module.get_submodule(path)
        report.layers.append(
            LayerResult(
                name=path,
                module=path,
                module_type=type(sub).__name__,
                call=0,
                output_index=0,
                order=len(calls),
                depth=_depth(path),
                status="unmatched",
                reason=f"{REASON_NOT_CALLED} in the eager forward (its parent uses its parameters directly)",
                reason_kind=REASON_NOT_CALLED,
            )
        )
    log.debug("per-layer: %s on %s, %d extra outputs", report.counts, backend.name, extra)
    return report


def _input_sources(
    c: _Call,
    calls: list[_Call],
    producer: dict[int, tuple[int, int]],
    input_ids: list[int],
    names: dict[tuple[int, int], str],
    g: _Graph,
    fnames: dict[int, str],
) -> list[str]:
    """Where each input tensor of a call came from: a graph input, an earlier layer, a functional op
    (``fnames`` by tensor id), or untracked ops."""
    sources = []
    for t in c.input_ids:
        if t in input_ids:
            idx = input_ids.index(t)
            sources.append(f"input {g.graph_inputs[idx]}" if idx < len(g.graph_inputs) else "input")
            continue
        src = _source_call(t, calls, producer, c.order)
        if src is not None:
            sources.append(names[src])
        else:
            sources.append(fnames.get(t) or f"ops of {_parent(c.path) or _ROOT_LABEL}")
    return sources


def _functional_layers(
    trace: EagerTrace, fvalues: dict[int, str], produced: dict[str, np.ndarray], tol: Tolerance, g: _Graph
) -> dict[int, list[tuple[LayerResult, FunctionalCall]]]:
    """A compared row per matched functional call, keyed by the module call it precedes."""
    rows: dict[int, list[tuple[LayerResult, FunctionalCall]]] = {}
    for k, value in sorted(fvalues.items()):
        call = trace.functional[k]
        actual = produced.get(value)
        if actual is None or tuple(np.shape(actual)) != tuple(call.output.shape):
            continue
        node = g.producer_node(value)
        magnitude = max_magnitude(call.output)
        tolerance = layer_tolerance(tol, magnitude)
        metrics = compare_tensors(call.name, actual, call.output, tolerance)
        rows.setdefault(call.after_call, []).append(
            (
                LayerResult(
                    name=call.name,
                    module=call.owner,
                    module_type=call.op,
                    call=call.index,
                    output_index=0,
                    order=call.after_call,
                    depth=_depth(call.owner) + 1,
                    status="pass" if metrics.passed else "fail",
                    reason=f"functional op at {call.file}:{call.line}",
                    onnx_value=value,
                    onnx_node=None if node is None else node.name,
                    op_type=None if node is None else node.op_type,
                    shape=tuple(call.output.shape),
                    tolerance=tolerance,
                    metrics=metrics,
                    ref_max_abs=magnitude,
                    kind="functional",
                ),
                call,
            )
        )
    return rows


def _run_instrumented(
    proto: onnx.ModelProto,
    g: _Graph,
    wanted: dict[str, np.ndarray],
    inputs: Sequence[torch.Tensor],
    backend: Backend,
    options: SessionOptions | None,
    model_path: Path,
) -> tuple[dict[str, np.ndarray], int]:
    """Expose the ``wanted`` values as extra outputs of ``proto`` (a fresh copy of the file) and run it.

    Each extra output carries the graph's ``value_info`` for it, or, where the graph has none, the dtype
    of the eager tensor it is compared with. The outputs are chunked so one run never holds more than
    :func:`_output_budget` bytes of them (one run for everything unless memory is short; each further
    chunk costs one more session). Returns every produced array by value name (graph inputs included, as
    fed) and how many outputs were added.
    """
    feeds = {name: t.detach().cpu().numpy() for name, t in zip(g.graph_inputs, inputs, strict=True)}
    taken = set(g.graph_outputs) | set(feeds)
    extra: list[tuple[onnx.ValueInfoProto, int]] = []
    for name, ref in wanted.items():
        if name in taken:
            continue
        taken.add(name)
        info = g.infos.get(name)
        if info is None or not info.type.tensor_type.elem_type:
            elem = onnx.helper.np_dtype_to_tensor_dtype(ref.dtype)
            info = onnx.helper.make_tensor_value_info(name, elem, None)
        extra.append((info, ref.nbytes))
    produced: dict[str, np.ndarray] = dict(feeds)
    n_outputs = len(proto.graph.output)
    for chunk in _chunks(extra, _output_budget()):
        del proto.graph.output[n_outputs:]
        proto.graph.output.extend(chunk)
        produced.update(_run_copy(proto, model_path, feeds, backend, options))
    return produced, len(extra)


def _chunks(extra: list[tuple[onnx.ValueInfoProto, int]], budget: int) -> list[list[onnx.ValueInfoProto]]:
    """Consecutive groups of outputs of at most ``budget`` bytes each (at least one output per group)."""
    chunks: list[list[onnx.ValueInfoProto]] = [[]]
    used = 0
    for info, nbytes in extra:
        if chunks[-1] and used + nbytes > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(info)
        used += nbytes
    return chunks


def _output_budget() -> int:
    """Bytes of extra outputs one run may hold: a quarter of the memory available now (the eager
    references of the same layers are already in memory), at least 64 MiB."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            kib = next(int(line.split()[1]) for line in fh if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 1 << 30
    return max(64 << 20, kib * 1024 // 4)


def _run_copy(
    proto: onnx.ModelProto,
    model_path: Path,
    feeds: dict[str, np.ndarray],
    backend: Backend,
    options: SessionOptions | None,
) -> dict[str, np.ndarray]:
    """Run the instrumented copy once. A model with external data keeps referencing its data file: the
    copy (graph only) is written beside the original as a hidden scratch file, never the weights."""
    opts = dataclasses.replace(options) if options is not None else SessionOptions()
    external = has_external_data(proto)
    folder = str(model_path.parent) if external else _scratch_dir()
    try:
        fd, name = tempfile.mkstemp(prefix=f".{model_path.stem}.per-layer.", suffix=".onnx", dir=folder)
    except OSError as e:
        raise OnnxLoadError(
            f"per-layer needs a scratch copy of the graph beside {model_path} (its external data is "
            f"referenced, not copied), and that folder is not writable: {e}"
        ) from e
    os.close(fd)
    path = Path(name)
    try:
        if proto.ByteSize() < PROTOBUF_LIMIT:  # a private scratch file: no atomic rename needed
            path.write_bytes(proto.SerializeToString())
        else:
            save_onnx(proto, path)  # external data beside it
        with backend.load(path, opts) as runner:
            run_feeds = {
                meta.name: _cast_float(feeds[meta.name], meta.dtype) for meta in runner.inputs if meta.name in feeds
            }
            if len(run_feeds) != len(runner.inputs):
                raise InputSpecError(
                    f"the instrumented model takes inputs {runner.input_names}, the graph declares {sorted(feeds)}"
                )
            return runner.infer(run_feeds)
    finally:
        path.unlink(missing_ok=True)
        path.with_name(data_file_name(path)).unlink(missing_ok=True)


def _cast_float(arr: np.ndarray, dtype: Any) -> np.ndarray:
    """Cast between float types only (an fp16 model takes fp16 feeds); never touch integer inputs."""
    target = np.dtype(dtype) if dtype is not None else arr.dtype
    if arr.dtype != target and np.issubdtype(arr.dtype, np.floating) and np.issubdtype(target, np.floating):
        return arr.astype(target)
    return arr


def _fill_metrics(
    layer: LayerResult,
    m: _Match,
    ref: np.ndarray,
    produced: dict[str, np.ndarray],
    tol: Tolerance,
    g: _Graph,
    seen: dict[str, list[tuple[np.ndarray, LayerResult]]],
) -> None:
    """Compare one matched layer under its effective tolerance; a shape mismatch makes it unmatched.

    A block returns its last child's tensor, so the same (value, reference) pair recurs; ``seen`` reuses
    those metrics instead of recomputing them (the metrics dominate the per-layer cost on small models).
    """
    name = m.value or ""
    node = g.producer_node(name)
    layer.onnx_value = name
    layer.onnx_node = node.name if node is not None else f"input {name}"
    layer.op_type = node.op_type if node is not None else "graph input"
    if m.alias_of:
        layer.reason = f"identity in eager: compared at {m.alias_of!r}"
    actual = produced.get(name)
    if actual is None:
        layer.status, layer.reason_kind = "unmatched", REASON_NO_COUNTERPART
        layer.reason = f"{REASON_NO_COUNTERPART}: the backend did not return {name!r}"
        return
    if tuple(np.shape(actual)) != tuple(ref.shape):
        layer.status, layer.reason_kind = "unmatched", REASON_SHAPE
        layer.reason = (
            f"{REASON_SHAPE}: ONNX value {name!r} has shape {'x'.join(map(str, np.shape(actual)))}, "
            f"eager {'x'.join(map(str, ref.shape))}"
        )
        return
    for earlier_ref, earlier in seen.get(name, []):
        if earlier.metrics is not None and earlier_ref.dtype == ref.dtype and np.array_equal(earlier_ref, ref):
            layer.ref_max_abs, layer.tolerance = earlier.ref_max_abs, earlier.tolerance
            layer.metrics = dataclasses.replace(earlier.metrics, name=layer.name)
            layer.status = earlier.status
            return
    layer.ref_max_abs = max_magnitude(ref)
    layer.tolerance = layer_tolerance(tol, layer.ref_max_abs)
    layer.metrics = compare_tensors(layer.name, actual, ref, layer.tolerance)
    layer.status = "pass" if layer.metrics.passed else "fail"
    seen.setdefault(name, []).append((ref, layer))


def _scratch_dir() -> str | None:
    """Where the instrumented copy goes: RAM-backed ``/dev/shm`` when writable (the copy only lives for
    one session load), else the default temp dir."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def _credit_exporter_fusions(
    layers: list[LayerResult], calls: list[_Call], produced: dict[str, np.ndarray], tol: Tolerance
) -> None:
    """Re-attribute a fusion whose node kept the *first* module's provenance (Conv+BN folded by the
    TorchScript exporter stays ``/conv1/Conv``).

    Such a layer fails against its own module's output but matches the next sibling that fed on it and
    owns no node (the BN). Then the sibling is compared at that value (and passes) and the first module
    is "fused into" it. A real fault in the fused node fails against both and stays where provenance put
    it, so fault localization is unchanged.
    """
    for k, layer in enumerate(layers):
        if layer.status != "fail" or layer.onnx_value is None:
            continue
        for nxt in layers[k + 1 :]:
            if nxt.onnx_value is not None or layer.name not in nxt.inputs_from:
                continue
            if _parent(nxt.module) != _parent(layer.module) or nxt.shape != layer.shape:
                continue
            ref = calls[nxt.order].outputs[nxt.output_index]
            actual = produced.get(layer.onnx_value)
            if ref is None or actual is None:
                break
            magnitude = max_magnitude(ref)
            tolerance = layer_tolerance(tol, magnitude)
            metrics = compare_tensors(nxt.name, actual, ref, tolerance)
            if not metrics.passed:
                break
            nxt.status, nxt.reason_kind, nxt.fused_into = "pass", "", None
            nxt.reason = f"computed by {layer.op_type} {layer.onnx_node!r}, whose provenance names {layer.module}"
            nxt.onnx_value, nxt.onnx_node, nxt.op_type = layer.onnx_value, layer.onnx_node, layer.op_type
            nxt.metrics, nxt.tolerance, nxt.ref_max_abs = metrics, tolerance, magnitude
            for other in layers:
                if nxt.name in other.absorbed:
                    other.absorbed.remove(nxt.name)
            nxt.absorbed.append(layer.name)
            layer.status, layer.fused_into, layer.reason_kind = "fused", nxt.module, ""
            layer.reason = f"{layer.op_type} {layer.onnx_node!r} computes {nxt.name} (the exporter fused them)"
            layer.onnx_value, layer.metrics, layer.tolerance = None, None, None
            break


def _follow_credited(layers: list[LayerResult]) -> None:
    """A parent left unmatched because its child was (see :func:`_agree_with_children`) takes the
    child's comparison when :func:`_credit_exporter_fusions` matched the child after all."""
    by_name = {layer.name: layer for layer in layers}
    for layer in layers:  # execution order: a child is settled before its parent
        if layer.status != "unmatched" or not layer.reason.startswith("its output is "):
            continue
        child = by_name.get(layer.reason.removeprefix("its output is ").split("'s, which", 1)[0])
        if child is None or not child.matched or child.metrics is None:
            continue
        layer.status, layer.reason_kind = child.status, ""
        layer.reason = f"its output is {child.name}'s"
        layer.onnx_value, layer.onnx_node, layer.op_type = child.onnx_value, child.onnx_node, child.op_type
        layer.metrics = dataclasses.replace(child.metrics, name=layer.name)
        layer.tolerance, layer.ref_max_abs = child.tolerance, child.ref_max_abs


def _load_proto(path: str | Path) -> onnx.ModelProto:
    """The ONNX graph as a fresh protobuf without its weights (the instrumented copy is built on it),
    external-data locations checked; errors as OnnxLoadError.

    No checker pass: the backend has just loaded the same file, and checking costs more than the run.
    """
    return read_graph(path)


def _effective_sources(layer: LayerResult, by_name: dict[str, LayerResult]) -> list[str]:
    """The layer's input sources, looking through modules fused into it (a folded Conv's own input)."""
    found: list[str] = []
    pending = list(layer.inputs_from)
    seen: set[str] = set()
    while pending:
        src = pending.pop(0)
        if src in seen:
            continue
        seen.add(src)
        fused = by_name.get(src)
        if fused is not None and fused.status == "fused" and fused.fused_into == layer.module:
            pending.extend(fused.inputs_from)
        else:
            found.append(src)
    return found


def _first_divergence(layer: LayerResult, layers: list[LayerResult]) -> FirstDivergence:
    """Describe the first failing layer in one line: what moved, by how much, and where it entered."""
    assert layer.metrics is not None and layer.tolerance is not None  # only failed layers get here
    m = layer.metrics
    by_name = {other.name: other for other in layers}
    sources = _effective_sources(layer, by_name)
    checked = [s for s in sources if s.startswith("input ") or (s in by_name and by_name[s].status == "pass")]
    unchecked = [s for s in sources if s not in checked]
    if sources and not unchecked:
        where = f"its inputs ({', '.join(sources)}) match eager, so the error enters inside it"
    elif unchecked:
        where = f"its input from {', '.join(dict.fromkeys(unchecked))} is not compared, so the error may enter there"
    else:
        where = "it is the first layer compared"
    fused = f"; it also computes {', '.join(layer.absorbed)} (fused into it)" if layer.absorbed else ""
    explanation = (
        f"{layer.name} ({layer.op_type} {layer.onnx_node!r}) is the first layer out of tolerance: max abs "
        f"{m.max_abs:.3g} > atol_eff {layer.tolerance.atol:.3g} on {m.mismatch_fraction:.1%} of elements; "
        f"{where}{fused}"
    )
    return FirstDivergence(
        module=layer.module,
        name=layer.name,
        onnx_node=layer.onnx_node,
        onnx_value=layer.onnx_value,
        op_type=layer.op_type,
        max_abs=m.max_abs,
        max_rel=m.max_rel,
        mismatch_fraction=m.mismatch_fraction,
        atol=layer.tolerance.atol,
        rtol=layer.tolerance.rtol,
        order=layer.order,
        explanation=explanation,
    )
