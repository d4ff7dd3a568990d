"""``--norm-export custom``: native norms become TensorRT-plugin custom ops backed by ONNX functions.

Each native node is replaced by a node whose ``op_type`` is the TensorRT plugin name, because
TensorRT's ONNX parser dispatches plugins by ``op_type`` and ignores the domain (NORMS.md §4). Field
names and types are the plugin *creators'* (``PluginField(...)`` in TensorRT's
``plugin/*/…Plugin.cpp``), not their READMEs: the parser copies only attributes whose names match a
creator field and merely warns about the rest, so a misspelt field silently runs with its default.

==========================  ==============================  =============================================
native op                   custom op (domain trt.plugins)   creator fields (node attributes)
==========================  ==============================  =============================================
GroupNormalization (≥ 21)   ``GroupNormalizationPlugin``     eps: float32, num_groups: int32
InstanceNormalization       ``InstanceNormalization_TRT``    epsilon: float32, scales: float32[],
                                                             bias: float32[], relu: int32, alpha: float32
LayerNormalization          (kept native)                    —
==========================  ==============================  =============================================

LayerNormalization stays native: TensorRT ships no LayerNorm plugin (none in 10.0–11.1), and its ONNX
parser imports the native op as an ``INormalizationLayer``, which is what a plugin would have bought.

Every node also carries ``plugin_version`` and ``plugin_namespace``. The domain is ``trt.plugins``
because ORT's TensorRT EP only hands nodes of that domain to TensorRT plugins (ORT PR #17946).

The math stays in the file: a model-local ONNX function with the same (domain, name) holds the native
op, its attributes bound by reference (``epsilon = @eps``), so ORT CPU or any runtime without the
plugin runs exactly the original computation. Which one TensorRT picks depends on the parser: current
onnx-tensorrt imports a node that has a ``plugin_namespace`` attribute as a plugin when that plugin is
registered (before built-ins and local functions); 10.x parsers prefer a registered plugin over the
local function; older (9.x) parsers inline the local function. In every case the result is correct.

InstanceNormalization_TRT takes its scale and bias as plugin *fields*, not inputs, so the custom node
has one input and the function rebuilds the tensors with ``Constant(value_floats=@scales)``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import onnx_ir as ir

from normfold.errors import ExportError
from normfold.fusers.base import NormfoldPass, PassContext, RuleEvent
from normfold.io import load_onnx, save_onnx

logger = logging.getLogger(__name__)

TRT_PLUGIN_DOMAIN = "trt.plugins"
PLUGIN_NAMES: dict[str, str] = {
    "GroupNormalization": "GroupNormalizationPlugin",
    "InstanceNormalization": "InstanceNormalization_TRT",
}
_A = ir.AttributeType
PLUGIN_FIELDS: dict[str, dict[str, ir.AttributeType]] = {
    # plugin/groupNormalizationPlugin/groupNormalizationPlugin.cpp: PluginField("eps", kFLOAT32),
    # PluginField("num_groups", kINT32) — the README's "epsilon" is not read.
    "GroupNormalizationPlugin": {"eps": _A.FLOAT, "num_groups": _A.INT},
    # plugin/instanceNormalizationPlugin/instanceNormalizationPlugin.cu(pp): epsilon, scales, bias (kFLOAT32),
    # relu (kINT32), alpha (kFLOAT32).
    "InstanceNormalization_TRT": {
        "epsilon": _A.FLOAT,
        "scales": _A.FLOATS,
        "bias": _A.FLOATS,
        "relu": _A.INT,
        "alpha": _A.FLOAT,
    },
}
"""Creator fields per plugin; ONNX INT attributes become kINT32 in the parser. Tests check every emitted
attribute against this table."""
NATIVE_OPS: dict[str, str] = {
    "LayerNormalization": (
        "TensorRT has no LayerNorm plugin; its parser imports native LayerNormalization as an "
        "INormalizationLayer, so the node stays native"
    ),
}
"""Norms the pass accepts but keeps native, with the reason it reports."""
DEFAULT_OPS: tuple[str, ...] = (*PLUGIN_NAMES, *NATIVE_OPS)


def _attr(node: ir.Node, name: str, default: float | int) -> float | int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _const_array(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _ref(name: str, type_: ir.AttributeType) -> ir.Attr:
    return ir.RefAttr(name, name, type_)


def _plugin_attrs(version: str, namespace: str) -> list[ir.Attr]:
    return [ir.AttrString("plugin_version", version), ir.AttrString("plugin_namespace", namespace)]


def _function(
    plugin: str, body: list[ir.Node], body_inputs: list[ir.Value], output: ir.Value, attrs: list[ir.Attr], opset: int
) -> ir.Function:
    graph = ir.Graph(body_inputs, [output], nodes=body, opset_imports={"": opset}, name=plugin)
    return ir.Function(TRT_PLUGIN_DOMAIN, plugin, graph=graph, attributes=attrs)


def _group_norm_function(opset: int) -> ir.Function:
    x, scale, bias = ir.Value(name="X"), ir.Value(name="scale"), ir.Value(name="bias")
    y = ir.Value(name="Y")
    node = ir.Node(
        "",
        "GroupNormalization",
        [x, scale, bias],
        [ir.RefAttr("epsilon", "eps", _A.FLOAT), _ref("num_groups", _A.INT)],
        outputs=[y],
    )
    attrs = [ir.AttrFloat32("eps", 1e-5), ir.AttrInt64("num_groups", 1), *_plugin_attrs("1", "")]
    return _function("GroupNormalizationPlugin", [node], [x, scale, bias], y, attrs, opset)


def _instance_norm_function(opset: int) -> ir.Function:
    x, y = ir.Value(name="X"), ir.Value(name="Y")
    scales, bias = ir.Value(name="scales"), ir.Value(name="bias")
    nodes = [
        ir.Node("", "Constant", [], [ir.RefAttr("value_floats", "scales", _A.FLOATS)], outputs=[scales]),
        ir.Node("", "Constant", [], [ir.RefAttr("value_floats", "bias", _A.FLOATS)], outputs=[bias]),
        ir.Node("", "InstanceNormalization", [x, scales, bias], [_ref("epsilon", _A.FLOAT)], outputs=[y]),
    ]
    attrs = [
        ir.AttrFloat32("epsilon", 1e-5),
        ir.AttrFloat32s("scales", []),
        ir.AttrFloat32s("bias", []),
        ir.AttrInt64("relu", 0),
        ir.AttrFloat32("alpha", 0.0),
        *_plugin_attrs("1", ""),
    ]
    return _function("InstanceNormalization_TRT", nodes, [x], y, attrs, opset)


_FUNCTIONS = {
    "GroupNormalization": _group_norm_function,
    "InstanceNormalization": _instance_norm_function,
}


class CustomNormPass(NormfoldPass):
    """Replace native LN/GN/IN nodes with TensorRT-plugin custom ops + model-local functions.

    ``y = Plugin(x, …; fields)`` with ``Plugin`` defined as ``y = NativeNorm(x, …; attrs = @fields)``,
    so the rewrite is the identity on every runtime that expands functions.
    """

    name: ClassVar[str] = "custom-norms"

    def __init__(
        self,
        ctx: PassContext | None = None,
        *,
        ops: Collection[str] = DEFAULT_OPS,
        plugin_version: str = "1",
        plugin_namespace: str = "",
    ) -> None:
        super().__init__(ctx)
        unknown = sorted(set(ops) - set(DEFAULT_OPS))
        if unknown:
            raise ExportError(f"no TensorRT plugin mapping for {unknown}; supported: {sorted(DEFAULT_OPS)}")
        self.ops = frozenset(ops)
        self.plugin_version = plugin_version
        self.plugin_namespace = plugin_namespace

    def run(self, model: ir.Model) -> bool:
        graph = model.graph
        opset = graph.opset_imports.get("", model.opset_imports.get("", 0))
        used: set[str] = set()
        for node in list(graph):
            if node.domain or node.op_type not in self.ops:
                continue
            reason = NATIVE_OPS.get(node.op_type) or self._reason_to_skip(node, opset)
            if reason:
                self.skipped([node], reason)
                continue
            self._replace(graph, node)
            used.add(node.op_type)
        for op in sorted(used):
            fn = _FUNCTIONS[op](opset)
            model.functions[fn.identifier()] = fn
        if used:
            graph.opset_imports[TRT_PLUGIN_DOMAIN] = 1
        return bool(used)

    def _reason_to_skip(self, node: ir.Node, opset: int) -> str:
        if any(out.uses() or out.is_graph_output() for out in node.outputs[1:]):
            return f"{node.op_type} statistics outputs (Mean/InvStdDev) are used; the plugin has one output"
        if node.op_type in ("LayerNormalization", "GroupNormalization") and _attr(node, "stash_type", 1) != 1:
            return "stash_type is not 1 (fp32 statistics); the plugin always computes statistics in fp32"
        if node.op_type == "GroupNormalization" and opset < 21:
            return (
                f"GroupNormalization at opset {opset} has per-group scale/bias (deprecated -18 semantics); "
                "GroupNormalizationPlugin takes per-channel scale/bias: export at opset >= 21"
            )
        params = node.inputs[1:3]
        if node.op_type == "InstanceNormalization" and any(_const_array(v) is None for v in params):
            return "scale/bias are not constants; InstanceNormalization_TRT takes them as plugin fields"
        return ""

    def _replace(self, graph: ir.Graph, node: ir.Node) -> None:
        plugin = PLUGIN_NAMES[node.op_type]
        eps = float(_attr(node, "epsilon", 1e-5))
        inputs: list[ir.Value | None] = list(node.inputs)
        attrs: list[ir.Attr]
        if node.op_type == "GroupNormalization":
            attrs = [ir.AttrFloat32("eps", eps), ir.AttrInt64("num_groups", int(_attr(node, "num_groups", 1)))]
        else:
            attrs = [ir.AttrFloat32("epsilon", eps)]
            scales = _const_array(inputs[1])
            bias = _const_array(inputs[2])
            if scales is None or bias is None:  # _reason_to_skip checked this; keep the node if it changed
                return
            attrs += [
                ir.AttrFloat32s("scales", [float(v) for v in scales.ravel()]),
                ir.AttrFloat32s("bias", [float(v) for v in bias.ravel()]),
                ir.AttrInt64("relu", 0),
                ir.AttrFloat32("alpha", 0.0),
            ]
            inputs = [inputs[0]]
        attrs += _plugin_attrs(self.plugin_version, self.plugin_namespace)
        output = node.outputs[0]
        replacement = ir.Node(
            TRT_PLUGIN_DOMAIN,
            plugin,
            inputs,
            attrs,
            num_outputs=1,
            name=node.name,
            metadata_props=dict(node.metadata_props),
        )
        new_out = replacement.outputs[0]
        new_out.shape, new_out.type = output.shape, output.type
        graph.insert_before(node, replacement)
        output.replace_all_uses_with(new_out, replace_graph_outputs=True)
        new_out.name = output.name
        params = list(node.inputs[1:])
        graph.remove(node, safe=True)
        for value in params:  # IN scale/bias now live in the node's fields
            if value is None or not value.is_initializer() or value.uses():
                continue
            if not value.is_graph_input() and not value.is_graph_output() and value.name:
                del graph.initializers[value.name]
        self.applied([replacement], f"{node.op_type} → {TRT_PLUGIN_DOMAIN}::{plugin}")


@dataclass
class CustomNormReport:
    """Result of :func:`to_custom_norms`: what was replaced, what was skipped and why."""

    path: Path | None
    replaced: dict[str, int]
    events: list[RuleEvent] = field(default_factory=list)
    model: onnx.ModelProto | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, object]:
        return {
            "path": str(self.path) if self.path is not None else None,
            "replaced": dict(self.replaced),
            "events": [e.to_dict() for e in self.events],
        }


def to_custom_norms(
    src: str | os.PathLike[str] | onnx.ModelProto,
    dst: str | os.PathLike[str] | None = None,
    *,
    ops: Collection[str] = DEFAULT_OPS,
    plugin_version: str = "1",
    plugin_namespace: str = "",
) -> CustomNormReport:
    """Rewrite ``src`` with TensorRT-plugin custom norms (see module docstring); write ``dst`` if given.

    The result passes ``onnx.checker`` (full check) or :class:`ExportError` is raised and nothing is
    written.
    """
    if isinstance(src, onnx.ModelProto):
        proto = src
    else:
        proto = load_onnx(Path(src))
    try:
        onnx.checker.check_model(proto, full_check=True)
        source_valid = True
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        logger.warning("source model does not pass onnx.checker (%s); the result is not checked either", e)
        source_valid = False
    model = ir.from_proto(proto)
    ctx = PassContext()
    CustomNormPass(ctx, ops=ops, plugin_version=plugin_version, plugin_namespace=plugin_namespace).call(model)
    out = ir.to_proto(model)
    try:
        if source_valid:
            onnx.checker.check_model(out, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"custom-norm export produced an invalid model: {e}") from e
    replaced: dict[str, int] = {}
    for node in out.graph.node:
        if node.domain == TRT_PLUGIN_DOMAIN:
            replaced[node.op_type] = replaced.get(node.op_type, 0) + 1
    for event in ctx.events:
        if event.status == "skipped" and event.reason not in NATIVE_OPS.values():
            logger.warning("custom norms: kept native %s: %s", ",".join(event.nodes), event.reason)
    path = None
    if dst is not None:
        path = Path(dst)
        save_onnx(out, path)
    return CustomNormReport(path, replaced, list(ctx.events), out)


def to_plugin_ops(proto: onnx.ModelProto) -> onnx.ModelProto:
    """What ``export(..., norm_export="custom")`` calls: :func:`to_custom_norms` on an in-memory model."""
    report = to_custom_norms(proto)
    if report.model is None:  # to_custom_norms always sets it; keep the type honest without assert
        raise ExportError("custom-norm export returned no model")
    return report.model
