"""fp16 / bf16 conversion that keeps normalization statistics in fp32 ("fp32 islands").

Why: a norm's statistics are where half precision breaks. ``var = mean((x-μ)²)`` overflows fp16 as soon
as ``|x-μ| > 256`` (256² = 65536 > 65504), and ``x-μ`` cancels catastrophically when ``|μ| ≫ σ``.
TensorRT ≥ 10.12 deprecates (and 11 removes) per-layer precision on weakly typed networks; a strongly
typed network takes every tensor's type from the ONNX graph, so the only way to say "this LayerNorm runs
in fp32" is to put ``Cast(to=FLOAT)`` before it and ``Cast(to=FLOAT16)`` after it (NORMS.md §4).

The rewrite, for a low-precision type ``L`` (FLOAT16 or BFLOAT16):

* every node outside an island computes in ``L``: its FLOAT outputs are retyped to ``L``, FLOAT
  initializers and Constant tensors it reads are converted (fp16: values beyond ±65504 are clamped to
  ±65504 and values that flush to zero are counted; both are reported), ``Cast(to=FLOAT)`` becomes
  ``Cast(to=L)``;
* an island node (LayerNormalization, GroupNormalization, InstanceNormalization, BatchNormalization,
  RMSNormalization, Softmax, and the ReduceMean/Sub/Pow/Add/Sqrt/Reciprocal/Div statistics chain of a
  norm that is still decomposed) keeps FLOAT: its FLOAT inputs get ``Cast(to=FLOAT)`` and its consumers
  get ``Cast(to=L)``, one Cast per (value, type) however many consumers share it;
* ``y = Cast_L(norm(Cast_f32(x)))`` equals the fp32 norm rounded once to ``L``, so the island adds one
  rounding of the output and none to the statistics;
* ``keep_io_types``: graph inputs and outputs stay FLOAT, with Casts at the boundary.

Nodes that call a model-local function (e.g. TensorRT-plugin custom norms) and the Random* / Range ops
(whose fp16 variants do not exist) always stay FLOAT. Control flow (If/Loop/Scan) is refused: the
subgraphs capture outer values whose types this pass would change.

The automatic mode (:func:`select_fp32_islands`) starts with every island in low precision, asks a
callable for per-tensor errors against a reference, keeps in fp32 the islands whose output error
exceeds a threshold *and* grows by more than ``growth``× over their input error (the error is created
there, not inherited), and repeats until no island is added.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir

from normfold.errors import BackendUnavailableError, FusionError, OnnxLoadError, UsageError
from normfold.exporter.provenance import module_path, set_module_path
from normfold.fusers.base import NormfoldPass, PassContext
from normfold.io import load_onnx, save_onnx
from normfold.onnx_files import uses_external_data
from normfold.runtime.base import SessionOptions
from normfold.runtime.onnxruntime import create_session

logger = logging.getLogger(__name__)

Precision = Literal["fp16", "bf16"]

DECOMPOSED_NORM = "DecomposedNorm"
"""Pseudo op type in ``fp32_ops``: the statistics chain of a norm that was not fused into one op."""

NORM_OPS: frozenset[str] = frozenset(
    {
        "LayerNormalization",
        "GroupNormalization",
        "InstanceNormalization",
        "BatchNormalization",
        "RMSNormalization",
    }
)
DEFAULT_FP32_OPS: frozenset[str] = NORM_OPS | {"Softmax", DECOMPOSED_NORM}
ALWAYS_FP32_OPS: frozenset[str] = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Range"}
)
FLOAT32_ONLY_INPUTS: dict[str, tuple[int, ...]] = {"Resize": (2,), "Upsample": (1,)}
_CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})
_LOW_TYPES: dict[str, ir.DataType] = {"fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}
_FP16_MAX = float(np.finfo(np.float16).max)
_FP16_TINY = float(np.finfo(np.float16).smallest_subnormal)


@dataclass(frozen=True)
class Island:
    """Nodes that stay fp32 together; ``anchor`` names the island (the norm node, or the variance mean)."""

    anchor: str
    kind: str
    nodes: tuple[ir.Node, ...]

    def to_dict(self) -> dict[str, object]:
        return {"anchor": self.anchor, "kind": self.kind, "nodes": [n.name for n in self.nodes]}


@dataclass(frozen=True)
class ConversionIssue:
    """An initializer or Constant whose values did not survive the cast unchanged in range."""

    tensor: str
    clamped: int
    flushed_to_zero: int
    max_abs: float

    def to_dict(self) -> dict[str, object]:
        return {
            "tensor": self.tensor,
            "clamped": self.clamped,
            "flushed_to_zero": self.flushed_to_zero,
            "max_abs": self.max_abs,
        }


@dataclass
class PrecisionStats:
    """What one :class:`PrecisionPass` run did (filled in by the pass, read by the report)."""

    islands: list[Island] = field(default_factory=list)
    low_islands: list[str] = field(default_factory=list)
    casts_inserted: int = 0
    tensors_converted: int = 0
    issues: list[ConversionIssue] = field(default_factory=list)


@dataclass
class AutoRound:
    """One round of the automatic selection: the error seen at each still-low island."""

    kept_before: list[str]
    island_errors: dict[str, tuple[float, float]]
    added: list[str]

    def to_dict(self) -> dict[str, object]:
        return {
            "kept_before": self.kept_before,
            "island_errors": {k: {"input": i, "output": o} for k, (i, o) in self.island_errors.items()},
            "added": self.added,
        }


@dataclass
class PrecisionReport:
    """Result of :func:`convert_precision`."""

    path: Path | None
    precision: Precision
    keep_io_types: bool
    fp32_islands: list[Island]
    low_islands: list[str]
    casts_inserted: int
    tensors_converted: int
    issues: list[ConversionIssue]
    auto_rounds: list[AutoRound] = field(default_factory=list)
    model: onnx.ModelProto | None = field(default=None, repr=False)

    @property
    def fp32_nodes(self) -> list[str]:
        return [n.name or "" for isl in self.fp32_islands for n in isl.nodes]

    def to_dict(self) -> dict[str, object]:
        return {
            "path": str(self.path) if self.path is not None else None,
            "precision": self.precision,
            "keep_io_types": self.keep_io_types,
            "fp32_islands": [i.to_dict() for i in self.fp32_islands],
            "low_islands": list(self.low_islands),
            "casts_inserted": self.casts_inserted,
            "tensors_converted": self.tensors_converted,
            "issues": [i.to_dict() for i in self.issues],
            "auto_rounds": [r.to_dict() for r in self.auto_rounds],
        }


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _is_square(node: ir.Node) -> ir.Value | None:
    """The base ``a`` when ``node`` is ``Pow(a, 2)`` or ``Mul(a, a)``, else None."""
    if node.op_type == "Pow" and len(node.inputs) == 2:
        exponent = _const(node.inputs[1])
        if exponent is not None and exponent.size == 1 and float(exponent.reshape(())) == 2.0:
            return node.inputs[0]
    if node.op_type == "Mul" and len(node.inputs) == 2 and node.inputs[0] is node.inputs[1]:
        return node.inputs[0]
    return None


def _affine_tail(normalized: ir.Node) -> list[ir.Node]:
    """``Mul(n, γ)`` then ``Add(·, β)`` with constant γ/β right after the normalizing Div/Mul.

    They join the island so the Cast back to low precision sits after the whole norm: ORT's
    LayerNormFusion otherwise matches across the Cast and builds a LayerNormalization whose X is fp32
    and Scale fp16, which fails to load ("bound to different types").
    """
    tail = []
    node = normalized
    for op in ("Mul", "Add"):
        uses = node.outputs[0].uses()
        if len(uses) != 1:
            break
        user = uses[0][0]
        if user.op_type != op or not any(_const(v) is not None for v in user.inputs):
            break
        tail.append(user)
        node = user
    return tail


def _decomposed_norm_islands(graph: ir.Graph) -> list[Island]:
    """Statistics chains of unfused norms.

    Anchor: ``V = ReduceMean(Pow(a, 2) | Mul(a, a))`` (a second moment). Backwards, when
    ``a = Sub(x, ReduceMean(x))`` the centring belongs to the island too (that is where ``x-μ``
    cancels). Forwards: ``Add(V, const)`` → ``Sqrt`` → ``Reciprocal`` (+ the ``Mul`` that applies it) or
    the ``Div`` that divides by it, then the constant affine ``Mul``/``Add`` (see :func:`_affine_tail`).
    """
    islands = []
    for var in graph:
        if var.op_type != "ReduceMean" or var.inputs[0] is None:
            continue
        square = var.inputs[0].producer()
        if square is None:
            continue
        base = _is_square(square)
        if base is None:
            continue
        members: list[ir.Node] = []
        sub = base.producer()
        if sub is not None and sub.op_type == "Sub" and sub.inputs[1] is not None:
            mean = sub.inputs[1].producer()
            if mean is not None and mean.op_type == "ReduceMean" and mean.inputs[0] is sub.inputs[0]:
                members += [mean, sub]
        members += [square, var]
        frontier = [var.outputs[0]]
        while frontier:
            value = frontier.pop()
            for user, index in value.uses():
                op = user.op_type
                take = (
                    (op == "Add" and any(_const(v) is not None for v in user.inputs))
                    or op in ("Sqrt", "Reciprocal")
                    or (op == "Div" and index == 1)
                    or (op == "Mul" and value.producer() is not None and value.producer().op_type == "Reciprocal")
                )
                if take and user not in members:
                    members.append(user)
                    if op in ("Add", "Sqrt", "Reciprocal"):
                        frontier.append(user.outputs[0])
                    elif op in ("Div", "Mul"):
                        members += _affine_tail(user)
        islands.append(Island(var.name or "", DECOMPOSED_NORM, tuple(members)))
    return islands


def find_islands(graph: ir.Graph, fp32_ops: Collection[str] = DEFAULT_FP32_OPS) -> list[Island]:
    """Candidate fp32 islands of ``graph`` for ``fp32_ops`` (op types, plus :data:`DECOMPOSED_NORM`)."""
    islands = [Island(n.name or "", n.op_type, (n,)) for n in graph if n.op_type in fp32_ops and not n.domain]
    if DECOMPOSED_NORM in fp32_ops:
        claimed = {id(n) for isl in islands for n in isl.nodes}
        for isl in _decomposed_norm_islands(graph):
            if not any(id(n) in claimed for n in isl.nodes):
                islands.append(isl)
                claimed.update(id(n) for n in isl.nodes)
    return islands


def _missing_low_variant(node: ir.Node, low: ir.DataType, opset: int | None) -> str | None:
    """Why ``node`` cannot compute in ``low`` at ``opset`` per its ONNX schema (e.g. Conv < 22 and
    bf16), or None. Unknown domains and ops are assumed to accept it."""
    if opset is None or node.op_type in ("Cast", "Constant", "ConstantOfShape"):
        return None
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain or "")
    except onnx.defs.SchemaError:
        return None
    want = "tensor(float16)" if low == ir.DataType.FLOAT16 else "tensor(bfloat16)"
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    for values, formals in ((node.inputs, schema.inputs), (node.outputs, schema.outputs)):
        for i, value in enumerate(values):
            if value is None or value.dtype != ir.DataType.FLOAT or not formals:
                continue
            if values is node.inputs and i in FLOAT32_ONLY_INPUTS.get(node.op_type, ()):
                continue
            formal = formals[min(i, len(formals) - 1)]
            if want not in allowed.get(formal.type_str, {formal.type_str}):
                return f"{node.op_type}-{schema.since_version} has no {want} variant for {formal.name!r}"
    return None


def _name_nodes(graph: ir.Graph) -> None:
    """Give every node a unique, deterministic name: islands and the auto mode refer to nodes by name."""
    seen: set[str] = set()
    for i, node in enumerate(graph):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def _convert_array(array: np.ndarray, low: ir.DataType, name: str) -> tuple[np.ndarray, ConversionIssue | None]:
    """Cast fp32 values to ``low``; for fp16 clamp out-of-range finite values (an inf weight is worse)."""
    array = np.asarray(array, dtype=np.float32)
    if low == ir.DataType.BFLOAT16:
        return array.astype(ml_dtypes.bfloat16), None
    finite = np.isfinite(array)
    magnitude = np.abs(array)
    over = finite & (magnitude > _FP16_MAX)
    flushed = finite & (array != 0) & (magnitude < _FP16_TINY / 2)
    with np.errstate(over="ignore"):
        converted = np.where(finite, np.clip(array, -_FP16_MAX, _FP16_MAX), array).astype(np.float16)
    issue = None
    if over.any() or flushed.any():
        issue = ConversionIssue(name, int(over.sum()), int(flushed.sum()), float(magnitude[finite].max(initial=0.0)))
    return converted, issue


class PrecisionPass(NormfoldPass):
    """Convert FLOAT tensors to fp16/bf16 outside fp32 islands (algebra in the module docstring).

    ``fp32_nodes`` adds single nodes to the fp32 set; ``low_islands`` names island anchors that are
    converted anyway (the automatic mode's knob). The outcome is written to ``self.stats``.
    """

    name: ClassVar[str] = "precision"

    def __init__(
        self,
        ctx: PassContext | None = None,
        *,
        precision: Precision = "fp16",
        keep_io_types: bool = False,
        fp32_ops: Collection[str] | None = None,
        fp32_nodes: Collection[str] = (),
        low_islands: Collection[str] = (),
    ) -> None:
        super().__init__(ctx)
        if precision not in _LOW_TYPES:
            raise UsageError(f"precision must be one of {sorted(_LOW_TYPES)}, got {precision!r}.")
        self.low = _LOW_TYPES[precision]
        self.keep_io_types = keep_io_types
        self.fp32_ops = frozenset(DEFAULT_FP32_OPS if fp32_ops is None else fp32_ops)
        self.fp32_nodes = frozenset(fp32_nodes)
        self.low_islands = frozenset(low_islands)
        self.stats = PrecisionStats()

    def run(self, model: ir.Model) -> bool:
        graph = model.graph
        for node in graph:
            if node.op_type in _CONTROL_FLOW and not node.domain:
                raise FusionError(
                    f"node {node.name!r} is {node.op_type}: precision conversion does not descend into "
                    "subgraphs, whose captured values it would retype; convert a model without control flow."
                )
        _name_nodes(graph)
        function_ids = {f.identifier()[:2] for f in model.functions.values()}

        fp32: set[ir.Node] = set()
        for island in find_islands(graph, self.fp32_ops):
            if island.anchor in self.low_islands:
                self.stats.low_islands.append(island.anchor)
                continue
            self.stats.islands.append(island)
            fp32.update(island.nodes)
            self.applied(list(island.nodes), f"{island.kind} kept in fp32")
        for node in graph:
            if node in fp32:
                continue
            reason: str | None = None
            if node.name in self.fp32_nodes:
                reason = "named in fp32_nodes"
            elif node.op_type in ALWAYS_FP32_OPS and not node.domain:
                reason = f"{node.op_type} has no fp16/bf16 variant"
            elif (node.domain, node.op_type) in function_ids:
                reason = "calls a model-local function whose body this pass does not convert"
            else:
                reason = _missing_low_variant(node, self.low, graph.opset_imports.get(node.domain or ""))
            if reason:
                fp32.add(node)
                self.stats.islands.append(Island(node.name or "", node.op_type, (node,)))
                self.skipped([node], f"kept in fp32: {reason}")

        low_values: set[ir.Value] = set()

        def wants_low(value: ir.Value) -> bool:
            """Constant-like producers follow their consumers: low when any consumer computes in low."""
            if value.is_graph_output() and not self.keep_io_types:
                return True
            return any(user not in fp32 for user, _ in value.uses())

        modified = False
        for node in list(graph):
            if node in fp32:
                continue
            if node.op_type in ("Cast", "Constant", "ConstantOfShape") and not node.domain:
                if not wants_low(node.outputs[0]):
                    continue
                modified |= self._retype_attr_node(node)
            for out in node.outputs:
                if out.dtype == ir.DataType.FLOAT:
                    out.dtype = self.low
                    low_values.add(out)
                    modified = True

        if not self.keep_io_types:
            for value in graph.inputs:
                if value.dtype == ir.DataType.FLOAT:
                    value.dtype = self.low
                    low_values.add(value)
                    modified = True

        for value in list(graph.initializers.values()):
            if value.dtype != ir.DataType.FLOAT or value.is_graph_input() or value.const_value is None:
                continue
            users = value.uses()
            low_users = [(u, i) for u, i in users if u not in fp32 and not self._fp32_slot(u, i)]
            if not low_users:
                continue
            array, issue = _convert_array(value.const_value.numpy(), self.low, value.name or "")
            if issue is not None:
                self.stats.issues.append(issue)
            self.stats.tensors_converted += 1
            modified = True
            if len(low_users) == len(users) and not value.is_graph_output():
                value.const_value = ir.tensor(array, name=value.name)
                value.dtype = self.low
                low_values.add(value)
                continue
            copy = ir.Value(name=f"{value.name}_{self.low.name.lower()}", shape=value.shape)
            copy.const_value = ir.tensor(array, name=copy.name)
            copy.dtype = self.low
            graph.register_initializer(copy)
            low_values.add(copy)
            for user, index in low_users:
                user.replace_input_with(index, copy)

        casts: dict[tuple[int, ir.DataType], ir.Value] = {}

        def cast_of(value: ir.Value, to: ir.DataType, before: ir.Node | None, anchor: ir.Node | None) -> ir.Value:
            key = (id(value), to)
            if key not in casts:
                out = ir.Value(name=f"{value.name}_to_{to.name.lower()}", shape=value.shape)
                out.dtype = to
                cast = ir.Node("", "Cast", [value], [ir.AttrInt64("to", to.value)], outputs=[out])
                cast.name = f"{value.name}_cast_{to.name.lower()}"
                if anchor is not None:
                    set_module_path(cast, module_path(anchor))
                if before is None:
                    graph.append(cast)
                else:
                    graph.insert_before(before, cast)
                casts[key] = out
                self.stats.casts_inserted += 1
            return casts[key]

        for node in list(graph):
            if node.op_type == "Cast" and not node.domain:
                continue
            for index, value in enumerate(node.inputs):
                if value is None or value.dtype not in (ir.DataType.FLOAT, self.low):
                    continue
                if value.dtype == self.low and value not in low_values:
                    continue  # the source model was already low precision here; leave it alone
                want = ir.DataType.FLOAT if node in fp32 or self._fp32_slot(node, index) else self.low
                if value.dtype != want:
                    node.replace_input_with(index, cast_of(value, want, node, node))
                    modified = True

        want_out = ir.DataType.FLOAT if self.keep_io_types else self.low
        for position, value in enumerate(list(graph.outputs)):
            if value.dtype not in (ir.DataType.FLOAT, self.low) or value.dtype == want_out:
                continue
            if value.dtype == self.low and value not in low_values:
                continue
            public = value.name
            value.name = f"{public}_{value.dtype.name.lower()}"
            out = cast_of(value, want_out, None, value.producer())
            out.name = public
            graph.outputs[position] = out
            modified = True
        return modified

    def _fp32_slot(self, node: ir.Node, index: int) -> bool:
        return not node.domain and index in FLOAT32_ONLY_INPUTS.get(node.op_type, ())

    def _retype_attr_node(self, node: ir.Node) -> bool:
        """Cast/Constant/ConstantOfShape produce FLOAT because of an attribute; make that attribute low."""
        if node.op_type == "Cast":
            to = node.attributes.get("to")
            if to is not None and to.as_int() == ir.DataType.FLOAT.value:
                node.attributes["to"] = ir.AttrInt64("to", self.low.value)
                return True
            return False
        if node.op_type == "Constant":
            for key in ("value_float", "value_floats"):
                if key in node.attributes:
                    array = np.asarray(node.attributes.pop(key).value, dtype=np.float32)
                    node.attributes["value"] = ir.AttrTensor("value", ir.tensor(array))
        attr = node.attributes.get("value")
        if attr is None:
            return False
        tensor = attr.as_tensor()
        if tensor.dtype != ir.DataType.FLOAT:
            return False
        array, issue = _convert_array(tensor.numpy(), self.low, node.name or "")
        if issue is not None:
            self.stats.issues.append(issue)
        node.attributes["value"] = ir.AttrTensor("value", ir.tensor(array, name=tensor.name))
        self.stats.tensors_converted += 1
        return True


def _load_proto(src: str | os.PathLike[str] | onnx.ModelProto) -> onnx.ModelProto:
    """The model with external data in memory and inferred value types (the pass needs every dtype)."""
    if isinstance(src, onnx.ModelProto):
        return _infer_types(src)
    return _infer_types(load_onnx(src))


def _infer_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape/type inference so intermediate values carry a dtype; a value without one is not converted."""
    try:
        return onnx.shape_inference.infer_shapes(model)
    except onnx.shape_inference.InferenceError as e:
        raise OnnxLoadError(f"ONNX shape inference failed before precision conversion: {e}") from e


ErrorFn = Callable[[onnx.ModelProto], Mapping[str, float]]
"""Given a low-precision model, the error of each tensor (by value name) against the fp32 reference."""


@dataclass(frozen=True)
class AutoPrecision:
    """Settings of the automatic island selection (see :func:`select_fp32_islands`)."""

    error_fn: ErrorFn
    threshold: float = 1e-2
    growth: float = 4.0
    max_rounds: int = 4


def _island_io(island: Island) -> tuple[list[str], list[str]]:
    """Float values flowing into an island (constants excluded), and every float value it produces.

    Internal values count as outputs: on a real fp16 backend each is stored in fp16, and a backend
    that quietly widens a chain (ORT CPU inserts fp32 Casts around ops without fp16 kernels) would
    otherwise hide an overflowing variance behind a finite final output.
    """
    members = set(island.nodes)
    ins, outs = [], []
    for node in island.nodes:
        for value in node.inputs:
            if value is None or value.dtype != ir.DataType.FLOAT or _const(value) is not None:
                continue
            if value.producer() not in members and value.name not in ins:
                ins.append(value.name or "")
        outs += [v.name or "" for v in node.outputs if v.dtype == ir.DataType.FLOAT]
    return ins, outs


def select_fp32_islands(
    src: str | os.PathLike[str] | onnx.ModelProto,
    auto: AutoPrecision,
    *,
    precision: Precision = "fp16",
    keep_io_types: bool = False,
    fp32_ops: Collection[str] | None = None,
) -> tuple[list[str], list[AutoRound]]:
    """Pick the island anchors that must stay fp32, from measured per-tensor errors.

    An island is kept when the worst error among the tensors it produces exceeds ``threshold`` and is
    more than ``growth`` times its input error: the error is *created* there. Islands downstream of a
    bad one see a bad input, so they are judged again in the next round, after the culprit was moved
    back to fp32.

    Known ORT 1.31 issue: a *decomposed* norm left in fp16 right after a ``Cast(to=FLOAT16)`` is
    matched by ORT's LayerNormFusion across the Cast, which builds a LayerNormalization with mixed
    fp32/fp16 inputs that fails to load ("bound to different types"). Run such models with graph
    optimizations disabled, or fuse the norm first (``optimize``) so it is a LayerNormalization op.
    """
    proto = _load_proto(src)
    reference = ir.from_proto(proto)
    _name_nodes(reference.graph)
    candidates = find_islands(reference.graph, DEFAULT_FP32_OPS if fp32_ops is None else fp32_ops)
    io = {isl.anchor: _island_io(isl) for isl in candidates}
    kept: list[str] = []
    rounds: list[AutoRound] = []
    for _ in range(auto.max_rounds):
        low = [isl.anchor for isl in candidates if isl.anchor not in kept]
        if not low:
            break
        model = ir.from_proto(proto)
        PrecisionPass(precision=precision, keep_io_types=keep_io_types, fp32_ops=fp32_ops, low_islands=low).call(model)
        errors = auto.error_fn(ir.to_proto(model))
        seen: dict[str, tuple[float, float]] = {}
        added = []
        for anchor in low:
            ins, outs = io[anchor]
            in_err = max((errors.get(n, 0.0) for n in ins), default=0.0)
            out_err = max((errors.get(n, 0.0) for n in outs), default=0.0)
            seen[anchor] = (in_err, out_err)
            if out_err > auto.threshold and out_err > auto.growth * in_err:
                added.append(anchor)
        rounds.append(AutoRound(list(kept), seen, added))
        logger.info("auto precision round %d: keeping %s in fp32", len(rounds), added)
        if not added:
            break
        kept += added
    return kept, rounds


def convert_precision(
    src: str | os.PathLike[str] | onnx.ModelProto,
    dst: str | os.PathLike[str] | None = None,
    *,
    precision: Precision = "fp16",
    keep_io_types: bool = False,
    fp32_ops: Collection[str] | None = None,
    fp32_nodes: Sequence[str] = (),
    auto: AutoPrecision | None = None,
) -> PrecisionReport:
    """Convert ``src`` to fp16/bf16 with fp32 norm islands; write ``dst`` when given.

    ``fp32_ops`` defaults to :data:`DEFAULT_FP32_OPS`. With ``auto``, every candidate island starts in
    low precision and only those :func:`select_fp32_islands` picks stay fp32. The result passes
    ``onnx.checker`` (full check) or a :class:`FusionError` is raised and nothing is written.
    """
    proto = _load_proto(src)
    rounds: list[AutoRound] = []
    low_islands: list[str] = []
    if auto is not None:
        kept, rounds = select_fp32_islands(
            proto, auto, precision=precision, keep_io_types=keep_io_types, fp32_ops=fp32_ops
        )
        probe = ir.from_proto(proto)
        _name_nodes(probe.graph)
        ops = DEFAULT_FP32_OPS if fp32_ops is None else fp32_ops
        all_anchors = [i.anchor for i in find_islands(probe.graph, ops)]
        low_islands = [a for a in all_anchors if a not in kept]
    model = ir.from_proto(proto)
    pass_ = PrecisionPass(
        precision=precision,
        keep_io_types=keep_io_types,
        fp32_ops=fp32_ops,
        fp32_nodes=fp32_nodes,
        low_islands=low_islands,
    )
    pass_.call(model)
    out = ir.to_proto(model)
    try:
        onnx.checker.check_model(out, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise FusionError(f"{precision} conversion produced an invalid model: {e}") from e
    stats = pass_.stats
    for issue in stats.issues:
        logger.warning(
            "%s: %d values clamped to the %s range and %d flushed to zero (max |x| = %g)",
            issue.tensor,
            issue.clamped,
            precision,
            issue.flushed_to_zero,
            issue.max_abs,
        )
    path = None
    if dst is not None:
        path = Path(dst)
        save_onnx(out, path, external=True if uses_external_data(src) else None)
    return PrecisionReport(
        path=path,
        precision=precision,
        keep_io_types=keep_io_types,
        fp32_islands=stats.islands,
        low_islands=stats.low_islands,
        casts_inserted=stats.casts_inserted,
        tensors_converted=stats.tensors_converted,
        issues=stats.issues,
        auto_rounds=rounds,
        model=out,
    )


def ort_tensor_errors(
    reference: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> ErrorFn:
    """An :data:`ErrorFn` that runs both models on ORT with every shared float tensor exposed.

    Error per tensor: ``max|a-b| / max(max|b|, 1e-6)`` (relative to the reference's range, so it is
    comparable across layers); non-finite values in ``a`` give ``inf``. On a GPU, pass the CUDA or
    TensorRT provider and the error is that of the deployed backend.
    """

    def run_all(proto: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
        model = ir.from_proto(proto)
        values = {v.name: v for n in model.graph for v in n.outputs}
        present = {v.name for v in model.graph.outputs}
        for name in names:
            if name in values and name not in present:
                model.graph.outputs.append(values[name])
        session = create_session(
            ir.to_proto(model).SerializeToString(),
            list(providers),
            SessionOptions(graph_optimization_level="disable"),
        )
        if session.get_providers()[0] != providers[0]:  # ORT falls back silently; errors must be the target's
            raise BackendUnavailableError(
                f"auto precision: the session fell back to {session.get_providers()} instead of {providers[0]}"
            )
        inputs = {i.name: i for i in session.get_inputs()}
        typed = {}
        for name, array in feeds.items():
            want = np.float16 if inputs[name].type == "tensor(float16)" else array.dtype
            typed[name] = np.asarray(array).astype(want)
        outs = [o.name for o in session.get_outputs()]
        return dict(zip(outs, session.run(outs, typed), strict=True))

    ref_model = ir.from_proto(reference)
    float_names = [v.name or "" for n in ref_model.graph for v in n.outputs if v.dtype == ir.DataType.FLOAT and v.name]
    ref_values = run_all(reference, float_names)

    def error_fn(low: onnx.ModelProto) -> dict[str, float]:
        got = run_all(low, [n for n in float_names if n in ref_values])
        errors = {}
        for name, expected in ref_values.items():
            if name not in got:
                continue
            a = np.asarray(got[name], dtype=np.float64)
            b = np.asarray(expected, dtype=np.float64)
            if a.shape != b.shape:
                continue
            if not np.isfinite(a).all():
                errors[name] = float("inf")
                continue
            scale = max(float(np.abs(b).max(initial=0.0)), 1e-6)
            errors[name] = float(np.abs(a - b).max(initial=0.0)) / scale
        return errors

    return error_fn
