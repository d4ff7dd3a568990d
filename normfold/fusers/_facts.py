"""Read-only facts about a model that matching needs: constant values of small subgraphs, shapes, dtypes.

:class:`GraphFacts` never touches the model. It computes the value of shape-sized constant subgraphs
(``Reshape(Constant, Constant)``, ``Unsqueeze(weight, Range(...))``, ``Shape`` of a static tensor...)
with numpy, and reads static and symbolic shapes/dtypes from ``onnx.shape_inference`` run on a
serialized copy (once per pass run, primed before the first rewrite).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir

from normfold.fusers._graph import attr_int, attr_ints

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
        start = attr_int(node, "start", 0)
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
        return a.astype(ir.DataType(attr_int(node, "to", 1)).numpy())
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
        allowzero = attr_int(node, "allowzero", 0)
        shape = [a.shape[i] if t == 0 and not allowzero else t for i, t in enumerate(target)]
        return a.reshape(shape)
    if op in ("Unsqueeze", "Squeeze"):
        axes_arr = args[1] if len(args) > 1 else None
        axes = [int(i) for i in axes_arr.reshape(-1)] if axes_arr is not None else attr_ints(node, "axes")
        if op == "Squeeze":
            return np.squeeze(a, axis=tuple(axes) if axes is not None else None)
        if axes is None:
            return None
        out_rank = a.ndim + len(axes)
        out = a
        for axis in sorted(int(ax) % out_rank for ax in axes):
            out = np.expand_dims(out, axis)
        return out
    if op == "Expand":
        dims = tuple(int(s) for s in np.asarray(args[1]).reshape(-1))
        return np.broadcast_to(a, np.broadcast_shapes(a.shape, dims)).copy()
    if op == "Concat":
        return np.concatenate([x for x in args if x is not None], axis=attr_int(node, "axis", 0))
    if op == "Range":
        if args[1] is None or args[2] is None:
            return None
        return np.arange(a.item(), args[1].item(), args[2].item(), dtype=a.dtype)
    if op == "Gather":
        if args[1] is None:
            return None
        return np.take(a, args[1].astype(np.int64), axis=attr_int(node, "axis", 0))
    if op == "ReduceProd":
        axes = attr_ints(node, "axes")
        if len(args) > 1 and args[1] is not None:
            axes = [int(i) for i in args[1].reshape(-1)]
        keep = bool(attr_int(node, "keepdims", 1))
        return np.prod(a, axis=tuple(axes) if axes else None, keepdims=keep)
    if op == "ConstantOfShape":
        attr = node.attributes.get("value")
        fill = np.asarray(attr.as_tensor().numpy()).reshape(-1) if attr is not None else np.zeros(1, np.float32)
        return np.full(tuple(int(s) for s in a.reshape(-1)), fill[0], dtype=fill.dtype)
    return None


# -- the core matcher ------------------------------------------------------------------------------
