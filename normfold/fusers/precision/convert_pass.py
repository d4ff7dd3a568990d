"""The precision pass: FLOAT → fp16/bf16 outside fp32 islands (algebra in :mod:`normfold.fusers.precision`)."""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir

from normfold.errors import FusionError, UsageError
from normfold.exporter.provenance import module_path, set_module_path
from normfold.fusers.base import NormfoldPass, PassContext
from normfold.fusers.precision.islands import (
    ALWAYS_FP32_OPS,
    DEFAULT_FP32_OPS,
    FLOAT32_ONLY_INPUTS,
    NORM_OPS,
    Island,
    find_islands,
    name_nodes,
)

logger = logging.getLogger(__name__)

Precision = Literal["fp16", "bf16"]
_CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})
_LOW_TYPES: dict[str, ir.DataType] = {"fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}
_FP16_MAX = float(np.finfo(np.float16).max)
_FP16_TINY = float(np.finfo(np.float16).smallest_subnormal)


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


def _fill_norm_dtypes(graph: ir.Graph, function_ids: set[tuple[str, str]]) -> None:
    """Give norm outputs that shape inference left untyped the type of their input (``Y: T`` of ``X: T``).

    ONNX has no type inference for GroupNormalization-21 or for calls of model-local functions, and a
    value without a dtype would get no Cast back to low precision behind its fp32 island.
    """
    for node in graph:
        typed = (node.op_type in NORM_OPS and not node.domain) or (node.domain, node.op_type) in function_ids
        source = node.inputs[0] if node.inputs else None
        if typed and source is not None and source.dtype is not None:
            for out in node.outputs[:1]:
                if out.dtype is None:
                    out.dtype = source.dtype


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
        name_nodes(graph)
        function_ids = {f.identifier()[:2] for f in model.functions.values()}
        _fill_norm_dtypes(graph, function_ids)
        fp32 = self._fp32_set(graph, function_ids)
        low_values: set[ir.Value] = set()
        modified = self._retype(graph, fp32, low_values)
        modified |= self._convert_initializers(graph, fp32, low_values)
        modified |= self._insert_casts(graph, fp32, low_values)
        return modified

    def _fp32_set(self, graph: ir.Graph, function_ids: set[tuple[str, str]]) -> set[ir.Node]:
        """Island nodes, plus single nodes that must stay fp32 (named, no low variant, function calls)."""
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
        return fp32

    def _retype(self, graph: ir.Graph, fp32: set[ir.Node], low_values: set[ir.Value]) -> bool:
        """FLOAT outputs of low nodes (and, without keep_io_types, graph inputs) become the low type."""

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
        return modified

    def _convert_initializers(self, graph: ir.Graph, fp32: set[ir.Node], low_values: set[ir.Value]) -> bool:
        """FLOAT initializers read by low nodes are converted; one shared with fp32 users gets a low copy."""
        modified = False
        for value in list(graph.initializers.values()):
            if value.dtype != ir.DataType.FLOAT or value.is_graph_input() or value.const_value is None:
                continue
            users = list(value.uses())
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
        return modified

    def _insert_casts(self, graph: ir.Graph, fp32: set[ir.Node], low_values: set[ir.Value]) -> bool:
        """A Cast wherever a value's type differs from what its consumer computes in (one per value/type)."""
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

        modified = False
        for node in list(graph):
            if node.op_type == "Cast" and not node.domain:
                continue
            for index, operand in enumerate(node.inputs):
                if operand is None or operand.dtype not in (ir.DataType.FLOAT, self.low):
                    continue
                if operand.dtype == self.low and operand not in low_values:
                    continue  # the source model was already low precision here; leave it alone
                want = ir.DataType.FLOAT if node in fp32 or self._fp32_slot(node, index) else self.low
                if operand.dtype != want:
                    node.replace_input_with(index, cast_of(operand, want, node, node))
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
