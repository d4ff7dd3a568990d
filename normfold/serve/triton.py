"""Write a Triton Inference Server model repository for one ONNX model.

Layout (what ``tritonserver --model-repository=REPO`` expects)::

    REPO/NAME/config.pbtxt
    REPO/NAME/1/model.onnx      (platform "onnxruntime" → Triton platform onnxruntime_onnx)
    REPO/NAME/1/model.plan      (platform "tensorrt"    → Triton platform tensorrt_plan)

The options and their platform rules live in :mod:`normfold.serve.triton_options`, the ``config.pbtxt``
text and its validation in :mod:`normfold.serve.triton_config`; this module reads the graph and writes.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from normfold.errors import OnnxLoadError, UsageError
from normfold.io import atomic_dir, write_text
from normfold.onnx_files import copy_external_data, read_graph, resolve_external_data
from normfold.serve.triton_config import (
    TRITON_PLATFORMS,
    InstanceKind,
    Platform,
    TritonTensor,
    graph_tensors,
    render_config,
    validate_config,
)
from normfold.serve.triton_options import TritonOptions, resolve

logger = logging.getLogger(__name__)

MODEL_FILENAMES: dict[str, str] = {"onnxruntime": "model.onnx", "tensorrt": "model.plan"}
VERSION = "1"

__all__ = [
    "MODEL_FILENAMES",
    "TRITON_PLATFORMS",
    "VERSION",
    "InstanceKind",
    "Platform",
    "TritonOptions",
    "TritonRepoReport",
    "TritonTensor",
    "render_config",
    "validate_config",
    "write_triton_repo",
]


@dataclass
class TritonRepoReport:
    """What was written. ``os.fspath(report)`` is the model directory, so it works where a path does."""

    repo_dir: Path
    model_dir: Path
    model_file: Path
    config_path: Path
    config_text: str
    name: str
    platform: str
    max_batch: int
    inputs: list[TritonTensor]
    outputs: list[TritonTensor]
    validated_with_protobuf: bool
    notes: list[str] = field(default_factory=list)

    def __fspath__(self) -> str:
        return str(self.model_dir)

    def to_dict(self) -> dict[str, object]:
        return {
            "repo_dir": str(self.repo_dir),
            "model_dir": str(self.model_dir),
            "model_file": str(self.model_file),
            "config_path": str(self.config_path),
            "name": self.name,
            "platform": self.platform,
            "max_batch": self.max_batch,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "validated_with_protobuf": self.validated_with_protobuf,
            "notes": list(self.notes),
            "config_text": self.config_text,
        }


def _load_graph_io(onnx_path: Path) -> onnx.ModelProto:
    """The graph without its weights; every external-data location checked (:mod:`normfold.onnx_files`)."""
    if not onnx_path.is_file():
        raise OnnxLoadError(f"ONNX model {str(onnx_path)!r} does not exist; expected a path to a .onnx file.")
    return read_graph(onnx_path)


def write_triton_repo(
    onnx_path: str | os.PathLike[str],
    repo_dir: str | os.PathLike[str],
    *,
    name: str | None = None,
    platform: Platform = "onnxruntime",
    max_batch: int = 0,
    dynamic_batching: bool = False,
    preferred_batch_sizes: tuple[int, ...] = (),
    max_queue_delay_us: int = 0,
    instances: int = 1,
    kind: InstanceKind = "auto",
    fp16: bool = False,
    trt_accelerator: bool = False,
    engine_path: str | os.PathLike[str] | None = None,
    build_engine: bool = False,
    overwrite: bool = False,
) -> TritonRepoReport:
    """Write ``repo_dir/name/{config.pbtxt, 1/model.onnx|model.plan}`` and return what was written.

    ``fp16`` on the onnxruntime platform means the ORT backend's TensorRT accelerator with
    ``precision_mode: FP16`` (ORT's CUDA EP has no fp16 switch; convert the model itself with
    :func:`normfold.fusers.precision.convert_precision` for that). On the tensorrt platform precision is
    fixed when the engine is built, so ``fp16`` is rejected there unless ``build_engine`` builds the plan
    here (with the ``trt`` backend: fp16 with fp32 norm islands, one profile over batch 1..max_batch);
    that needs a GPU and TensorRT and otherwise raises :class:`BackendUnavailableError` with the reason.
    The model directory is built beside its destination and moved into place, so a failure never leaves
    half a repository.
    """
    onnx_path = Path(onnx_path)
    repo_dir = Path(repo_dir)
    requested = TritonOptions(
        name=name if name is not None else onnx_path.stem.split(".")[0],
        platform=platform,
        max_batch=max_batch,
        dynamic_batching=dynamic_batching,
        preferred_batch_sizes=preferred_batch_sizes,
        max_queue_delay_us=max_queue_delay_us,
        instances=instances,
        kind=kind,
        fp16=fp16,
        trt_accelerator=trt_accelerator,
        engine_path=Path(engine_path) if engine_path is not None else None,
        build_engine=build_engine,
    )
    resolved = resolve(requested, onnx_path)
    opts = resolved.options
    model = _load_graph_io(onnx_path)
    inputs, outputs, text = _render(model, opts)
    validated = validate_config(text)
    model_dir = repo_dir / opts.name
    notes = list(resolved.notes)
    notes += _write_model_dir(
        model_dir, model, onnx_path, resolved.engine_file, MODEL_FILENAMES[platform], text, overwrite
    )
    logger.info("wrote Triton model %s (%s) to %s", opts.name, TRITON_PLATFORMS[platform], model_dir)
    return TritonRepoReport(
        repo_dir=repo_dir,
        model_dir=model_dir,
        model_file=model_dir / VERSION / MODEL_FILENAMES[platform],
        config_path=model_dir / "config.pbtxt",
        config_text=text,
        name=opts.name,
        platform=TRITON_PLATFORMS[platform],
        max_batch=max_batch,
        inputs=inputs,
        outputs=outputs,
        validated_with_protobuf=validated,
        notes=notes,
    )


def _render(model: onnx.ModelProto, opts: TritonOptions) -> tuple[list[TritonTensor], list[TritonTensor], str]:
    """The graph's inputs (initializers aside) and outputs as Triton tensors, and the ``config.pbtxt`` text."""
    initializer_names = {t.name for t in model.graph.initializer}
    graph_inputs = (vi for vi in model.graph.input if vi.name not in initializer_names)
    inputs = graph_tensors(graph_inputs, opts.max_batch, "input")
    outputs = graph_tensors(model.graph.output, opts.max_batch, "output")
    text = render_config(
        name=opts.name,
        platform=opts.platform,
        max_batch=opts.max_batch,
        inputs=inputs,
        outputs=outputs,
        dynamic_batching=opts.dynamic_batching,
        preferred_batch_sizes=opts.preferred_batch_sizes,
        max_queue_delay_us=opts.max_queue_delay_us,
        instances=opts.instances,
        kind=opts.kind,
        trt_accelerator=opts.trt_accelerator,
        fp16=opts.fp16,
    )
    return inputs, outputs, text


def _write_model_dir(
    model_dir: Path,
    model: onnx.ModelProto,
    onnx_path: Path,
    engine_file: Path | None,
    model_filename: str,
    config_text: str,
    overwrite: bool,
) -> list[str]:
    """Stage ``model_dir`` (model or plan, its external data, config) and move it into place; the notes."""
    if model_dir.exists() and not model_dir.is_dir():
        raise UsageError(f"{str(model_dir)!r} exists and is not a directory.")
    if model_dir.is_dir() and any(model_dir.iterdir()) and not overwrite:
        raise UsageError(
            f"model directory {str(model_dir)!r} is not empty; pass overwrite=True (CLI: --overwrite) to replace it."
        )
    notes: list[str] = []
    refs = resolve_external_data(model, onnx_path) if engine_file is None else []
    with atomic_dir(model_dir) as staging:
        version_dir = staging / VERSION
        version_dir.mkdir()
        shutil.copyfile(engine_file if engine_file is not None else onnx_path, version_dir / model_filename)
        for location in copy_external_data(refs, version_dir):
            notes.append(f"copied external data {location!r}")
        write_text(staging / "config.pbtxt", config_text)
    return notes
