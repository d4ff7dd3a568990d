"""What ``write_triton_repo`` was asked for, checked and resolved before anything is read or written.

The resolution is where the platform rules live: a tensorrt-platform repository is only written with an
engine (Triton cannot build one from ONNX, and an empty ``model.plan`` would fail at load with a far less
helpful message); ``fp16`` on the onnxruntime platform means the ORT backend's TensorRT accelerator; a
TensorRT plan or accelerator forces GPU instances.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from normfold.errors import BackendUnavailableError, UsageError
from normfold.serve.triton_config import TRITON_PLATFORMS, InstanceKind, Platform


@dataclass(frozen=True)
class TritonOptions:
    """The repository's settings as given (see :func:`normfold.serve.write_triton_repo` for each)."""

    name: str
    platform: Platform = "onnxruntime"
    max_batch: int = 0
    dynamic_batching: bool = False
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    instances: int = 1
    kind: InstanceKind = "auto"
    fp16: bool = False
    trt_accelerator: bool = False
    engine_path: Path | None = None
    build_engine: bool = False

    def check(self) -> None:
        """Reject names, counts and batching settings that cannot make a valid repository."""
        name = self.name
        if not name or name in (".", "..") or "/" in name or os.sep in name:
            raise UsageError(f"model name {name!r} is not a valid directory name; pass --name.")
        if self.platform not in TRITON_PLATFORMS:
            raise UsageError(f"platform {self.platform!r} is not one of {sorted(TRITON_PLATFORMS)}.")
        if self.kind not in ("auto", "cpu", "gpu"):
            raise UsageError(f"instance kind {self.kind!r} is not one of auto, cpu, gpu.")
        if self.max_batch < 0:
            raise UsageError(f"max_batch must be >= 0 (0 disables Triton batching), got {self.max_batch}.")
        if self.instances < 1:
            raise UsageError(f"instances must be >= 1, got {self.instances}.")
        if self.dynamic_batching and self.max_batch == 0:
            raise UsageError(
                "dynamic batching needs max_batch > 0 (Triton batches along the first dim); pass --max-batch N."
            )
        if (self.preferred_batch_sizes or self.max_queue_delay_us) and not self.dynamic_batching:
            raise UsageError("preferred batch sizes and queue delay only apply with dynamic batching.")
        bad = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch]
        if bad:
            raise UsageError(f"preferred batch sizes {bad} are outside 1..max_batch ({self.max_batch}).")


@dataclass(frozen=True)
class ResolvedOptions:
    """The options after the platform rules: the final instance kind and accelerator, and the engine to copy."""

    options: TritonOptions
    engine_file: Path | None
    notes: list[str] = field(default_factory=list)


def resolve(options: TritonOptions, onnx_path: Path) -> ResolvedOptions:
    """Check ``options`` and apply the platform rules (building the engine here when asked to)."""
    options.check()
    if options.platform == "tensorrt":
        return _resolve_tensorrt(options, onnx_path)
    if options.engine_path is not None:
        raise UsageError("engine_path is only used with platform 'tensorrt'.")
    notes: list[str] = []
    if options.fp16 and not options.trt_accelerator:
        options = replace(options, trt_accelerator=True)
        notes.append("fp16 on the onnxruntime platform enables the TensorRT accelerator (FP16).")
    if options.trt_accelerator:
        if options.kind == "cpu":
            raise UsageError("the TensorRT accelerator runs on GPU instances; use kind 'gpu' or 'auto'.")
        options = replace(options, kind="gpu")
    return ResolvedOptions(options, None, notes)


def _resolve_tensorrt(options: TritonOptions, onnx_path: Path) -> ResolvedOptions:
    """The tensorrt platform serves a plan: a given one, or one built here with ``build_engine``."""
    if options.trt_accelerator:
        raise UsageError(
            "the TensorRT accelerator is an ORT-backend option; the tensorrt platform already serves a TensorRT engine."
        )
    if options.fp16 and not (options.build_engine and options.engine_path is None):
        raise UsageError(
            "--fp16 has no meaning for a prebuilt plan: its precision was fixed when the "
            "engine was built; build the engine with fp16 and pass it as the engine."
        )
    notes: list[str] = []
    engine_path = options.engine_path
    if engine_path is None and options.build_engine:
        engine_path = _build_plan(onnx_path, fp16=options.fp16, max_batch=options.max_batch)
        notes.append(f"built the TensorRT engine here ({'fp16' if options.fp16 else 'fp32'})")
    if engine_path is None:
        raise UsageError(
            "the tensorrt platform serves a serialized TensorRT engine (model.plan), and none was "
            "given; build one with the trt backend (normfold.runtime.tensorrt) and pass engine_path "
            "(CLI: --engine), or use --platform onnxruntime."
        )
    if not engine_path.is_file() or engine_path.stat().st_size == 0:
        raise UsageError(f"engine {str(engine_path)!r} does not exist or is empty.")
    if options.kind == "cpu":
        raise UsageError("a TensorRT plan runs on GPU only; instance kind 'cpu' is impossible.")
    return ResolvedOptions(replace(options, kind="gpu"), engine_path, notes)


def _build_plan(onnx_path: Path, *, fp16: bool, max_batch: int) -> Path:
    """Build a serialized engine with the ``trt`` backend (GPU + TensorRT needed; else the exact reason)."""
    from normfold.fusers.precision import model_for_precision
    from normfold.runtime.base import SessionOptions
    from normfold.runtime.tensorrt import build_engine, tensorrt_reason

    reason = tensorrt_reason()
    if reason is not None:
        raise BackendUnavailableError(
            f"cannot build a TensorRT engine for the tensorrt platform here: {reason}; build it on a GPU "
            "machine (or pass a prebuilt plan with --engine), or use --platform onnxruntime."
        )
    options = SessionOptions(
        precision="fp16" if fp16 else "fp32",
        batch_sizes=(1, max_batch) if max_batch > 0 else (1,),
        convert=model_for_precision,
    )
    return build_engine(onnx_path, options).path
