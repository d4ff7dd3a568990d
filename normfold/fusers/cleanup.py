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
that remain. Steps are linear in the graph size (``benchmarks/optimize_scaling.py``). Two steps are
skipped when a linear pre-check proves they have nothing to do, because on graphs with no constant work
they were 2/3 of the stage's cost (10k-node Conv→BN stack: folding 0.44 s and deduplication 0.63 s CPU
of 1.6 s): folding runs only when a node could fold (:func:`may_fold`: a ``Constant``, an op with one of
the folder's own partial evaluators, or a node whose inputs are all constants), deduplication only when
two small initializers are byte-equal (:func:`has_duplicate_initializers`, read from the raw protos
without building a tensor per initializer). Not used, measured:
onnxscript's rewriter, even with only its no-op/basic rules (``RewritePass``), grew from 3.3 s on 1k
nodes to 25 s on 3k (quadratic here), and ORT removes those no-ops itself; onnxscript's full ``optimize``
also runs its own BatchNorm fusion (unverified, no provenance).
"""

from __future__ import annotations

import logging
import math
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

DEDUP_SIZE_LIMIT = 1024  # DeduplicateInitializersPass's default: elements per initializer


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


def may_fold(model: ir.Model) -> bool:
    """False only when onnxscript's folder provably has nothing to do: no model functions, no subgraphs,
    and no node that is a ``Constant``, has a partial evaluator (``Shape``, ``Reshape``, ``Cast``, …) or
    reads only constants. The folder itself visits every node at ~40 µs each."""
    from onnxscript.optimizer._constant_folding import registry

    if model.functions:
        return True
    evaluated = {op for domain, op in registry.op_evaluators if domain in ("", "ai.onnx")}
    evaluated.update(("Constant", "Loop", "Scan"))  # Loop/Scan: the folder visits their subgraphs
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type in evaluated:
            return True  # other domains may carry subgraphs too: never skip on what is not known
        constant = all(v is None or v.const_value is not None for v in node.inputs)
        if constant and not any(v is not None and v.is_graph_input() for v in node.inputs):
            return True
    return False


def has_duplicate_initializers(model: ir.Model, size_limit: int = DEDUP_SIZE_LIMIT) -> bool:
    """True when two initializers of one graph, each of at most ``size_limit`` elements, hold the same
    dtype, shape and bytes: the only case where ``DeduplicateInitializersPass`` changes anything."""
    for graph in model.graphs():
        seen: set[tuple[int, tuple[int, ...], bytes]] = set()
        for value in graph.initializers.values():
            key = _content_key(value.const_value, size_limit)
            if key is None:
                continue
            if key in seen:
                return True
            seen.add(key)
    return False


def _content_key(tensor: ir.TensorProtocol | None, size_limit: int) -> tuple[int, tuple[int, ...], bytes] | None:
    """(dtype, shape, bytes) of a small tensor, as the library pass compares them; None when too big."""
    if tensor is None:
        return None
    proto = getattr(tensor, "raw", None)
    if isinstance(proto, onnx.TensorProto) and proto.HasField("raw_data"):  # skip building a Shape and an array
        dims = tuple(proto.dims)
        return (proto.data_type, dims, proto.raw_data) if math.prod(dims) <= size_limit else None
    if tensor.size > size_limit:
        return None
    data = repr(tensor.numpy().tolist()).encode() if tensor.dtype.is_string() else tensor.tobytes()
    return (int(tensor.dtype), tuple(tensor.shape.numpy()), data)


def _always(model: ir.Model) -> bool:
    return True


#: (label, factory, needed) in run order; the label names the step in the report, and ``needed`` is a
#: linear pre-check that skips a step with provably nothing to do.
STEPS: tuple[tuple[str, Callable[[], ir.passes.PassBase], Callable[[ir.Model], bool]], ...] = (
    ("constant folding (shape subgraphs included)", _fold_constants, may_fold),
    (
        "constants to initializers",
        lambda: LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        _always,
    ),
    ("duplicate small initializers", lambda: DeduplicateInitializersPass(DEDUP_SIZE_LIMIT), has_duplicate_initializers),
    ("identity elimination", IdentityEliminationPass, _always),
    ("common subexpression elimination", CommonSubexpressionEliminationPass, _always),
    ("unused nodes and initializers", RemoveUnusedNodesPass, _always),
    ("unused opsets", RemoveUnusedOpsetsPass, _always),
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
        before = _ops(model)  # counted per step: a step may leave dead nodes to the next one
        for label, factory, needed in STEPS:
            if not needed(model):
                logger.debug("clean-up step %r skipped: nothing it could change", label)
                continue
            try:
                modified = factory()(model).modified
            except Exception as e:  # a library pass bug must not lose the model: skip the step, say so
                logger.warning("clean-up step %r failed (%s: %s); skipped", label, type(e).__name__, e)
                self.ctx.events.append(self._event("skipped", f"{label} failed: {type(e).__name__}: {e}"))
                before = _ops(model)
                continue
            after = _ops(model)
            removed, before = before - after, after
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
