"""General clean-up before and after the norm passes, from onnx-ir's and onnxscript's own passes.

Exporters leave work that runtimes then redo or that hides patterns from their fusions: ``Constant``
nodes, shape subgraphs (``Shape → Gather → Div → Concat → Reshape``) whose result is static, duplicate
subexpressions, ``Identity`` chains and dead nodes. Nothing here is hand-written; each step is a
maintained library pass, run in this order:

1. onnx's shape inference (data propagation, non-strict), merged onto the values that have no shape
   (:func:`infer_shapes`): the folding rules then see the rank of a TorchScript MatMul output.
2. ``onnxscript``'s ``FoldConstantsPass``: evaluates constant subgraphs, including ``Shape``/``Size`` of
   statically shaped values. Pure evaluation, so exact. Its per-node onnx inference is off (step 1
   already stored the shapes; per node it costs ~1.5 ms, 15 s on 10k nodes).
3. ``LiftConstantsToInitializersPass``, ``DeduplicateInitializersPass`` (equal folded constants become
   one, so CSE can merge their readers), ``IdentityEliminationPass``,
   ``CommonSubexpressionEliminationPass``, ``RemoveUnusedNodesPass`` (nodes and initializers),
   ``RemoveUnusedOpsetsPass``.

Every step keeps or drops nodes; none creates a node from two sources, so provenance stays on the nodes
that remain. Steps are linear in the graph size (``benchmarks/optimize_scaling.py``). Not used, measured:
onnxscript's rewriter, even with only its no-op/basic rules (``RewritePass``), grew from 3.3 s on 1k
nodes to 25 s on 3k (quadratic here), and ORT removes those no-ops itself; onnxscript's full ``optimize``
also runs its own BatchNorm fusion (unverified, no provenance).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import (
    CommonSubexpressionEliminationPass,
    DeduplicateInitializersPass,
    IdentityEliminationPass,
    LiftConstantsToInitializersPass,
    NameFixPass,
    RemoveUnusedNodesPass,
    RemoveUnusedOpsetsPass,
)

from normfold.fusers.base import EventStatus, NormfoldPass, RuleEvent, register_pass

logger = logging.getLogger(__name__)


def _fold_constants() -> ir.passes.PassBase:
    from onnxscript.optimizer._constant_folding import (
        DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
        DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
        FoldConstantsPass,
    )

    return FoldConstantsPass(
        shape_inference=False,
        input_size_limit=DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
        output_size_limit=DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
    )


#: (label, factory) in run order; the label names the step in the report.
STEPS: tuple[tuple[str, Callable[[], ir.passes.PassBase]], ...] = (
    ("constant folding (shape subgraphs included)", _fold_constants),
    ("constants to initializers", lambda: LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)),
    ("duplicate small initializers", DeduplicateInitializersPass),
    ("identity elimination", IdentityEliminationPass),
    ("common subexpression elimination", CommonSubexpressionEliminationPass),
    ("unused nodes and initializers", RemoveUnusedNodesPass),
    ("unused opsets", RemoveUnusedOpsetsPass),
)


def infer_shapes(model: ir.Model) -> int:
    """Store onnx's inferred shapes/dtypes on the main graph's values that have none; returns how many.

    Non-strict with data propagation: an op onnx cannot infer stays unknown. Not onnx-ir's
    ``ShapeInferencePass``: it merges through a full model round trip and took 4.8 s on a 3k-node graph
    where onnx's inference itself takes 0.15 s; this merges by value name in one linear sweep.
    """
    if not _needs_shapes(model):
        return 0  # serializing a 10k-node graph for onnx's inference costs ~4 s: only when it can pay
    try:
        proto = onnx.shape_inference.infer_shapes(ir.to_proto(model), strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError) as e:
        logger.warning("shape inference failed (%s); the clean-up uses the shapes stored in the model", e)
        return 0
    inferred = {info.name: info.type for info in proto.graph.value_info}
    filled = 0
    for node in model.graph:
        for value in node.outputs:
            info = inferred.get(value.name or "")
            if info is None or not info.HasField("tensor_type"):
                continue
            tensor = info.tensor_type
            if value.dtype is None and tensor.elem_type:
                value.dtype = ir.DataType(tensor.elem_type)
            if value.shape is None and tensor.HasField("shape"):
                value.shape = ir.Shape([_dim(d) for d in tensor.shape.dim])
                filled += 1
    return filled


def _needs_shapes(model: ir.Model) -> bool:
    """True when a Shape/Size reads a value of unknown shape or a CastLike one of unknown dtype (folding
    needs them: timm's attention scale is ``CastLike(scale, q)``), or a BatchNormalization reads a
    MatMul/Gemm output of unknown rank (the folding rules need it; a Conv's rank is its weight's)."""
    for node in model.graph:
        x = node.inputs[0] if node.inputs else None
        if x is None:
            continue
        if node.op_type in ("Shape", "Size") and (x.shape is None or not x.shape.is_static()):
            return True
        like = node.inputs[1] if node.op_type == "CastLike" and len(node.inputs) > 1 else None
        if like is not None and like.dtype is None:
            return True  # CastLike folds to a constant once its target's dtype is known
        if node.op_type == "BatchNormalization" and x.shape is None:
            producer = x.producer()
            if producer is not None and producer.op_type in ("MatMul", "Gemm"):
                return True
    return False


def _dim(dim: onnx.TensorShapeProto.Dimension) -> int | str | None:
    if dim.HasField("dim_value"):
        return int(dim.dim_value)
    return dim.dim_param or None


@register_pass
class Cleanup(NormfoldPass):
    """Shape inference, constant folding, no-op/identity/duplicate/dead-node removal (see the module doc).

    Each step that changed the graph is one ``applied`` event whose detail says how many nodes of
    which ops it removed; ``modified`` ignores shape annotations, so the pipeline's fixed point holds.
    """

    name = "cleanup"

    def run(self, model: ir.Model) -> bool:
        infer_shapes(model)
        changed = False
        for label, factory in STEPS:
            before = _ops(model)
            try:
                modified = factory()(model).modified
            except Exception as e:  # a library pass bug must not lose the model: skip the step, say so
                logger.warning("clean-up step %r failed (%s: %s); skipped", label, type(e).__name__, e)
                self.ctx.events.append(self._event("skipped", f"{label} failed: {type(e).__name__}: {e}"))
                continue
            removed = before - _ops(model)  # counted per step: a step may leave dead nodes to the next one
            changed |= modified or bool(removed)
            if removed:
                detail = ", ".join(f"{op}×{n}" for op, n in removed.most_common(8))
                self.ctx.events.append(self._event("applied", f"{label}: removed {sum(removed.values())} ({detail})"))
        if changed:
            NameFixPass()(model)
        return changed

    def _event(self, status: EventStatus, text: str) -> RuleEvent:
        return RuleEvent(self.name, status, (), text)


def _ops(model: ir.Model) -> Counter[str]:
    return Counter(n.op_type for n in model.graph)
