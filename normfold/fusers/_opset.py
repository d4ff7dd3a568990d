"""Raising a model's default-domain opset safely, so a fuser can emit a newer op.

Raising the import is only safe when every other node means the same at the new version. For each
default-domain op in the graph we compare its schema version at the current opset and at the target:

* unchanged: nothing to do;
* changed, but only by new types or new attributes/inputs whose defaults keep the old behaviour
  (:data:`_COMPATIBLE`, e.g. Reshape-19, Conv-22, Cast-19's ``saturate`` which only affects float8):
  restamp;
* ``Reduce*``-18 moved ``axes`` from an attribute to an input: rewritten (:func:`_reduce_axes_to_input`);
* anything else (GroupNormalization-18 → 21 changed scale/bias from per-group to per-channel,
  GridSample-20 renamed its modes, BatchNormalization-14 with training outputs...): refused, naming the op.

We do not call onnx's C++ ``version_converter``: it restamps GroupNormalization-18 to 21 silently wrong
(NORMS.md §1). Nested graphs (If/Loop/Scan bodies) and model-local functions are checked the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import numpy as np
import onnx
import onnx_ir as ir

from normfold.errors import FusionError
from normfold.fusers._graph import Names, opset_of

logger = logging.getLogger(__name__)

# (op_type, since_version) pairs whose change keeps the meaning of nodes written for an older opset.
_TYPES_ONLY = {
    "Cast": (19, 21, 23, 24, 25),
    "CastLike": (15, 19, 21, 23, 24, 25),
    "Constant": (19, 21, 23, 24, 25),
    "ConstantOfShape": (20, 21, 23, 24, 25),
    "Identity": (14, 16, 19, 21, 23, 24, 25),
    "Reshape": (14, 19, 21, 23, 24, 25),
    "Shape": (15, 19, 21, 23, 24, 25),
    "Size": (19, 21, 23, 24, 25),
    "Flatten": (21, 23, 24, 25),
    "Squeeze": (21, 23, 24, 25),
    "Unsqueeze": (21, 23, 24, 25),
    "Transpose": (21, 23, 24, 25),
    "Pad": (18, 19, 21, 23, 24, 25),
    "If": (16, 19, 21, 23, 24, 25),
    "Loop": (16, 19, 21, 23, 24, 25),
    "Scan": (16, 19, 21, 23, 24, 25),
    "Add": (14,),
    "Sub": (14,),
    "Mul": (14,),
    "Div": (14,),
    "Relu": (14,),
    "Pow": (15,),
    "CumSum": (14,),
    "Equal": (19,),
    "GreaterOrEqual": (16,),
    "LessOrEqual": (16,),
    "Where": (16,),
    "LeakyRelu": (16,),
    "PRelu": (16,),
    "HardSwish": (14, 22),
    "Split": (18,),
    "Resize": (18, 19),
    "AveragePool": (19, 22),
    "LpPool": (18, 22),
    "ReduceMax": (20,),
    "ReduceMin": (20,),
    "ScatterElements": (16, 18),
    "ScatterND": (16, 18),
    "BatchNormalization": (14, 15),
    "Mish": (22,),
    "Conv": (22,),
    "ConvTranspose": (22,),
    "InstanceNormalization": (22,),
    "MaxPool": (22,),
    "GlobalAveragePool": (22,),
    "GlobalMaxPool": (22,),
    "Dropout": (22,),
    "Elu": (22,),
    "Selu": (22,),
    "HardSigmoid": (22,),
    "Softplus": (22,),
    "Softsign": (22,),
    "Round": (22,),
    "Sin": (22,),
    "Cos": (22,),
    "Tan": (22,),
    "LpNormalization": (22,),
    "GRU": (14, 22),
    "LSTM": (14, 22),
    "RNN": (14, 22),
}
_COMPATIBLE = {(op, v) for op, versions in _TYPES_ONLY.items() for v in versions}
_AXES_TO_INPUT_18 = {
    "ReduceMean",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceSumSquare",
}


def _since(op_type: str, opset: int) -> int | None:
    try:
        return int(onnx.defs.get_schema(op_type, opset, "").since_version)
    except onnx.defs.SchemaError:
        return None


def _changes(op_type: str, current: int, target: int) -> list[int]:
    """Schema versions of ``op_type`` introduced in (current, target]."""
    versions = []
    for opset in range(current + 1, target + 1):
        since = _since(op_type, opset)
        if since is not None and since == opset:
            versions.append(since)
    return versions


def _default_domain_nodes(model: ir.Model) -> list[ir.Node]:
    nodes = [n for n in model.graph.all_nodes() if n.domain in ("", "ai.onnx")]
    for function in model.functions.values():
        nodes.extend(n for n in function.all_nodes() if n.domain in ("", "ai.onnx"))
    return nodes


def opset_raise_blocker(model: ir.Model, target: int, *, exclude: Collection[ir.Node] = ()) -> str | None:
    """Why the model's default-domain opset cannot be raised to ``target``, or None when it can.

    ``exclude`` lists nodes written for the target opset already (the fused node itself).
    """
    skip = {id(n) for n in exclude}
    current = opset_of(model)
    if target <= current:
        return None
    newest = onnx.defs.onnx_opset_version()
    if target > newest:
        return f"target opset {target} is newer than this onnx ({onnx.__version__}) knows (max {newest})"
    nodes = [n for n in _default_domain_nodes(model) if id(n) not in skip]
    if current < 14 <= target and any(n.op_type == "BatchNormalization" and len(n.outputs) > 1 for n in nodes):
        # BN-9's extra outputs mean training statistics; from BN-14 they are invalid unless training_mode=1.
        return (
            f"raising opset {current} → {target}: a BatchNormalization with training outputs would change "
            "meaning at BatchNormalization-14 (training_mode)"
        )
    blocked: dict[str, list[int]] = {}
    for op_type in sorted({n.op_type for n in nodes}):
        if _since(op_type, current) is None:
            continue  # not an op at the current opset (e.g. a local function): nothing to restamp
        for version in _changes(op_type, current, target):
            if (op_type, version) in _COMPATIBLE:
                continue
            if version == 18 and op_type in _AXES_TO_INPUT_18:
                continue
            blocked.setdefault(op_type, []).append(version)
    if not blocked:
        return None
    changed = ", ".join(f"{op}-{'/'.join(map(str, v))}" for op, v in blocked.items())
    return (
        f"raising opset {current} → {target} would change the meaning of ops in the graph ({changed}); "
        "convert the model with onnxscript's version_converter first"
    )


def raise_opset(model: ir.Model, target: int, *, exclude: Collection[ir.Node] = ()) -> list[str]:
    """Raise the default-domain opset to ``target`` in place; returns the names of rewritten nodes.

    ``exclude``: nodes already written for ``target`` (e.g. the GroupNormalization-21 a pass just made).

    Raises:
        FusionError: when :func:`opset_raise_blocker` finds an op whose meaning would change.
    """
    current = opset_of(model)
    if target <= current:
        return []
    reason = opset_raise_blocker(model, target, exclude=exclude)
    if reason is not None:
        raise FusionError(f"cannot raise the model opset: {reason}")
    rewritten = []
    names = Names(model)
    for node in _default_domain_nodes(model):
        if node.op_type in _AXES_TO_INPUT_18 and current < 18 <= target and "axes" in node.attributes:
            _reduce_axes_to_input(node, names)
            rewritten.append(node.name or node.op_type)
        if node.version is not None:
            node.version = None
    for imports in [model.opset_imports, *(f.opset_imports for f in model.functions.values())]:
        if "ai.onnx" in imports:
            del imports["ai.onnx"]
        if "" in imports or imports is model.opset_imports:
            imports[""] = target
    needed = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", target)])
    if model.ir_version < needed:
        model.ir_version = needed
    logger.info("raised opset %d → %d (%d Reduce nodes moved axes to an input)", current, target, len(rewritten))
    return rewritten


def _reduce_axes_to_input(node: ir.Node, names: Names) -> None:
    """Reduce*-18: ``axes`` moved from an attribute to an optional int64 input (same meaning)."""
    axes = list(node.attributes.pop("axes").as_ints())
    graph = node.graph
    assert graph is not None
    const = ir.node(
        "Constant",
        [],
        attributes={"value": ir.tensor(np.asarray(axes, dtype=np.int64))},
        name=names.fresh(f"{node.name or node.op_type}_axes"),
    )
    const.outputs[0].name = names.fresh(f"{node.outputs[0].name or node.op_type}_axes")
    graph.insert_before(node, const)
    node.resize_inputs(2)
    node.replace_input_with(1, const.outputs[0])


def opset_plan(model: ir.Model, target: int | None, required: int, op_label: str) -> tuple[int | None, str | None]:
    """Whether a fusion emitting ``op_label`` (needs opset ``required``) may run on ``model``.

    Returns ``(raise_to, reason)``: ``raise_to`` is the opset to raise the model to (None: no raise),
    ``reason`` is why the fusion must be skipped (None: it may run).
    """
    opset = opset_of(model)
    if opset >= required:
        return None, None
    if target is None or target < required:
        return None, f"model opset {opset} < {required} ({op_label}); pass --target-opset {required} to raise it"
    return target, opset_raise_blocker(model, target)
