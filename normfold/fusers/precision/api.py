"""The conversion API: :func:`convert_precision` and its :class:`PrecisionReport`, and
:func:`model_for_precision`, the cached conversion the GPU backends load."""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_ir as ir

from normfold.errors import FusionError, UsageError
from normfold.fusers.precision.auto import AutoPrecision, AutoRound, load_proto, select_fp32_islands
from normfold.fusers.precision.convert_pass import ConversionIssue, Precision, PrecisionPass
from normfold.fusers.precision.islands import DECOMPOSED_NORM, DEFAULT_FP32_OPS, Island, find_islands, name_nodes
from normfold.io import save_onnx
from normfold.onnx_files import model_digest, uses_external_data

logger = logging.getLogger(__name__)


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
    validate_fp32_ops(fp32_ops)
    proto = load_proto(src)
    rounds: list[AutoRound] = []
    low_islands: list[str] = []
    if auto is not None:
        kept, rounds = select_fp32_islands(
            proto, auto, precision=precision, keep_io_types=keep_io_types, fp32_ops=fp32_ops
        )
        probe = ir.from_proto(proto)
        name_nodes(probe.graph)
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


def model_for_precision(onnx_path: Path, precision: str, cache_dir: Path) -> Path:
    """``onnx_path`` itself for fp32/tf32, else its fp16/bf16 conversion with fp32 norm islands and fp32 I/O.

    Cached under ``cache_dir/converted`` by content hash (the model and its external data), so the same
    model converts once. This is the :data:`~normfold.runtime.base.PrecisionConverter` that compare, bench,
    the gate and triton hand the GPU backends (``SessionOptions(convert=model_for_precision)``).
    """
    if precision in ("fp32", "tf32"):
        return onnx_path
    if precision not in ("fp16", "bf16"):
        raise UsageError(f"precision {precision!r} is not one of fp32, tf32, fp16, bf16")
    low: Precision = "fp16" if precision == "fp16" else "bf16"
    digest = model_digest(onnx_path)[:16]
    dst = cache_dir / "converted" / f"{onnx_path.stem}.{digest}.{low}.onnx"
    if not dst.exists():
        convert_precision(onnx_path, dst, precision=low, keep_io_types=True)
    return dst


def validate_fp32_ops(fp32_ops: Collection[str] | None) -> None:
    """Refuse op types that no ONNX schema defines (a typo would silently keep nothing in fp32).

    Islands match default-domain ops by ``op_type``, so a valid name is one ``onnx.defs`` knows, or
    :data:`DECOMPOSED_NORM`.
    """
    unknown = sorted(op for op in fp32_ops or () if op != DECOMPOSED_NORM and not onnx.defs.has(op))
    if unknown:
        raise UsageError(
            f"unknown op type(s) in fp32_ops: {', '.join(unknown)}; expected ONNX op types such as "
            f"LayerNormalization or Softmax, or {DECOMPOSED_NORM}"
        )
