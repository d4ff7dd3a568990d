"""``--norm-export decomposed``: normalization ops → primitive ops, for targets without native kernels.

LayerNormalization and GroupNormalization are ONNX *function ops*: their spec ships the exact
decomposition (a context-dependent function body). We take that body from the schema at the model's
opset and inline it, so the math is the spec's own, not ours. InstanceNormalization has no function
body; it becomes ``(x - mean) / sqrt(var + eps) · scale + B`` with mean/var from ReduceMean over the
spatial axes (biased variance, as the op defines). Every created node keeps the module path of the node
it replaces.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, cast

import numpy as np
import onnx
from onnx import TensorProto, defs, helper, inliner, numpy_helper, shape_inference

from normfold.errors import ExportError
from normfold.exporter.provenance import module_path, set_module_path

DOMAIN = "normfold.decomposed"
FUNCTION_OPS = ("LayerNormalization", "GroupNormalization")


class _FunctionSchema(Protocol):
    """The function-body part of ``onnx.defs.OpSchema``, which onnx's type stubs leave out (onnx 1.17+)."""

    since_version: int
    context_dependent_function_opset_versions: Sequence[int]
    function_opset_versions: Sequence[int]

    def get_context_dependent_function_with_opset_version(
        self, opset: int, node: bytes, input_types: list[bytes]
    ) -> bytes: ...

    def get_function_with_opset_version(self, opset: int) -> bytes: ...


def _opset(model: onnx.ModelProto) -> int:
    return next(int(i.version) for i in model.opset_import if i.domain in ("", "ai.onnx"))


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    inferred = shape_inference.infer_shapes(model)
    types = {v.name: v.type for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]}
    for init in model.graph.initializer:
        types[init.name] = helper.make_tensor_type_proto(init.data_type, list(init.dims))
    return types


def _function_body(node: onnx.NodeProto, opset: int, types: dict[str, onnx.TypeProto], name: str) -> onnx.FunctionProto:
    schema = cast(_FunctionSchema, defs.get_schema(node.op_type, opset, ""))
    fallback = helper.make_tensor_type_proto(TensorProto.FLOAT, None)
    input_types = [types.get(i, fallback).SerializeToString() for i in node.input]
    # The newest body written for an opset ≤ the model's; its ops only gained types since, so it is
    # restamped at the model's opset (the inliner needs one version per domain).
    ctx_versions = [v for v in schema.context_dependent_function_opset_versions if v <= opset]
    versions = [v for v in schema.function_opset_versions if v <= opset]
    if ctx_versions:
        body = onnx.FunctionProto.FromString(
            schema.get_context_dependent_function_with_opset_version(
                max(ctx_versions), node.SerializeToString(), input_types
            )
        )
    elif versions:
        body = onnx.FunctionProto.FromString(schema.get_function_with_opset_version(max(versions)))
    else:
        raise ExportError(f"{node.op_type}-{schema.since_version} has no function body to decompose into")
    for imp in body.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = opset
    return _as_local_function(body, node, name)


def _as_local_function(body: onnx.FunctionProto, node: onnx.NodeProto, name: str) -> onnx.FunctionProto:
    body.name, body.domain = name, DOMAIN
    # Attribute references (epsilon, axis, ...) are resolved by copying the call's attributes into the body.
    attrs = {a.name: a for a in node.attribute}
    for n in body.node:
        for a in list(n.attribute):
            if a.ref_attr_name:
                if a.ref_attr_name in attrs:
                    resolved = onnx.AttributeProto()
                    resolved.CopyFrom(attrs[a.ref_attr_name])
                    resolved.name = a.name
                    n.attribute.remove(a)
                    n.attribute.append(resolved)
                else:
                    n.attribute.remove(a)  # the op's default applies
        set_module_path(n, module_path(node))
    del body.attribute[:]
    del body.attribute_proto[:]
    return body


def _instance_norm_function(node: onnx.NodeProto, rank: int, opset: int, name: str) -> onnx.FunctionProto:
    eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
    spatial = list(range(2, rank))
    nodes: list[onnx.NodeProto] = []

    def reduce_mean(x: str, out: str) -> onnx.NodeProto:
        if opset >= 18:
            return helper.make_node("ReduceMean", [x, "axes"], [out], keepdims=1)
        return helper.make_node("ReduceMean", [x], [out], axes=spatial, keepdims=1)

    if opset >= 18:
        nodes.append(
            helper.make_node(
                "Constant", [], ["axes"], value=numpy_helper.from_array(np.array(spatial, dtype="int64"), "axes")
            )
        )
    nodes += [
        reduce_mean("input", "mean"),
        helper.make_node("Sub", ["input", "mean"], ["d"]),
        helper.make_node("Mul", ["d", "d"], ["d2"]),
        reduce_mean("d2", "var"),
        helper.make_node("Constant", [], ["eps"], value_float=eps),
        helper.make_node("CastLike", ["eps", "var"], ["eps_t"]),
        helper.make_node("Add", ["var", "eps_t"], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["std"]),
        helper.make_node("Div", ["d", "std"], ["normed"]),
        helper.make_node(
            "Constant",
            [],
            ["cshape"],
            value=numpy_helper.from_array(np.array([-1] + [1] * (rank - 2), dtype="int64"), "cshape"),
        ),
        helper.make_node("Reshape", ["scale", "cshape"], ["scale_c"]),
        helper.make_node("Reshape", ["B", "cshape"], ["bias_c"]),
        helper.make_node("Mul", ["normed", "scale_c"], ["scaled"]),
        helper.make_node("Add", ["scaled", "bias_c"], ["output"]),
    ]
    for n in nodes:
        set_module_path(n, module_path(node))
    return helper.make_function(
        DOMAIN, name, ["input", "scale", "B"], ["output"], nodes, [helper.make_opsetid("", opset)]
    )


def decompose_norms(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of ``model`` with LN/GN/IN replaced by primitive ops (see module docstring)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    opset = _opset(out)
    types = _value_types(out)
    changed = False
    for i, node in enumerate(out.graph.node):
        if node.domain not in ("", "ai.onnx"):
            continue
        name = f"{node.op_type}_{i}"
        if node.op_type in FUNCTION_OPS:
            fn = _function_body(node, opset, types, name)
        elif node.op_type == "InstanceNormalization":
            t = types.get(node.input[0])
            rank = len(t.tensor_type.shape.dim) if t is not None and t.tensor_type.HasField("shape") else 0
            if rank < 3:
                raise ExportError(f"cannot decompose {node.name or name}: the rank of its input is unknown")
            fn = _instance_norm_function(node, rank, opset, name)
        else:
            continue
        out.functions.append(fn)
        node.op_type, node.domain = name, DOMAIN
        del node.attribute[:]
        changed = True
    if not changed:
        return out
    out.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    inlined = inliner.inline_local_functions(out)
    del inlined.opset_import[:]
    inlined.opset_import.extend(o for o in out.opset_import if o.domain != DOMAIN)
    onnx.checker.check_model(inlined)
    return inlined
