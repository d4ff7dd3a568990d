"""Automatic fp32-island selection from measured per-tensor errors (:func:`select_fp32_islands`).

Error sources live in the runtime (:func:`normfold.runtime._gpu_precision.ort_tensor_errors` measures
on the exact session a backend builds); this module only decides which islands stay fp32.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir

from normfold.errors import OnnxLoadError
from normfold.fusers.precision.convert_pass import Precision, PrecisionPass
from normfold.fusers.precision.islands import DEFAULT_FP32_OPS, find_islands, island_io, name_nodes
from normfold.io import load_onnx

logger = logging.getLogger(__name__)


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


def load_proto(src: str | os.PathLike[str] | onnx.ModelProto) -> onnx.ModelProto:
    """The model with external data in memory and inferred value types (the pass needs every dtype)."""
    if isinstance(src, onnx.ModelProto):
        return _infer_types(src)
    return _infer_types(load_onnx(Path(src)))


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
    proto = load_proto(src)
    reference = ir.from_proto(proto)
    name_nodes(reference.graph)
    candidates = find_islands(reference.graph, DEFAULT_FP32_OPS if fp32_ops is None else fp32_ops)
    io = {isl.anchor: island_io(isl) for isl in candidates}
    kept: list[str] = []
    rounds: list[AutoRound] = []
    for _ in range(auto.max_rounds):
        low = [isl.anchor for isl in candidates if isl.anchor not in kept]
        if not low:
            break
        model = ir.from_proto(proto)
        # Measured with fp32 I/O whatever the final choice: the boundary Cast rounds the input exactly as
        # a low-precision feed would, and the error source then never has to build bf16 feeds.
        PrecisionPass(precision=precision, keep_io_types=True, fp32_ops=fp32_ops, low_islands=low).call(model)
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
