"""Write a Triton Inference Server model repository for one ONNX model.

Layout (what ``tritonserver --model-repository=REPO`` expects)::

    REPO/NAME/config.pbtxt
    REPO/NAME/1/model.onnx      (platform "onnxruntime" → Triton platform onnxruntime_onnx)
    REPO/NAME/1/model.plan      (platform "tensorrt"    → Triton platform tensorrt_plan)

``config.pbtxt`` is generated from the ONNX graph's inputs and outputs. With ``max_batch > 0`` Triton
prepends the batch dimension itself, so the first dimension of every tensor is stripped from ``dims``;
that dimension must therefore be dynamic in the ONNX model (a fixed batch of 1 cannot be batched).
The text is rendered here (no hard dependency on tritonclient) and, when tritonclient's
``model_config_pb2`` is importable, parsed back into Triton's real ``ModelConfig`` protobuf so a typo
in a field name fails at write time rather than at server start.

A tensorrt-platform repository is only written with an engine: Triton cannot build one from ONNX, and
an empty ``model.plan`` would fail at load with a far less helpful message.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import onnx

from normfold.errors import BackendUnavailableError, OnnxLoadError, UsageError
from normfold.io import atomic_dir, write_text
from normfold.onnx_files import copy_external_data, read_graph, resolve_external_data

logger = logging.getLogger(__name__)

Platform = Literal["onnxruntime", "tensorrt"]
InstanceKind = Literal["auto", "cpu", "gpu"]

TRITON_PLATFORMS: dict[str, str] = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
MODEL_FILENAMES: dict[str, str] = {"onnxruntime": "model.onnx", "tensorrt": "model.plan"}
VERSION = "1"

_ONNX_TO_TRITON: dict[int, str] = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16",
    onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.INT16: "TYPE_INT16",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.UINT16: "TYPE_UINT16",
    onnx.TensorProto.UINT32: "TYPE_UINT32",
    onnx.TensorProto.UINT64: "TYPE_UINT64",
    onnx.TensorProto.BOOL: "TYPE_BOOL",
    onnx.TensorProto.STRING: "TYPE_STRING",
}


@dataclass(frozen=True)
class TritonTensor:
    """One input or output as Triton sees it: ``dims`` excludes the batch dim when batching."""

    name: str
    data_type: str
    dims: tuple[int, ...]

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "data_type": self.data_type, "dims": list(self.dims)}


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


def _quote(text: str) -> str:
    """A protobuf text-format string literal (C escapes; non-ASCII as UTF-8 octal escapes)."""
    out = []
    for byte in text.encode("utf-8"):
        ch = chr(byte)
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif 32 <= byte < 127:
            out.append(ch)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def _load_graph_io(onnx_path: Path) -> onnx.ModelProto:
    """The graph without its weights; every external-data location checked (:mod:`normfold.onnx_files`)."""
    if not onnx_path.is_file():
        raise OnnxLoadError(f"ONNX model {str(onnx_path)!r} does not exist; expected a path to a .onnx file.")
    return read_graph(onnx_path)


def _tensors(
    values: Iterator[onnx.ValueInfoProto] | list[onnx.ValueInfoProto], max_batch: int, what: str
) -> list[TritonTensor]:
    tensors = []
    for vi in values:
        ttype = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise UsageError(f"{what} {vi.name!r} is not a tensor; Triton's ONNX backends serve tensors.")
        if ttype.elem_type not in _ONNX_TO_TRITON:
            type_name = onnx.TensorProto.DataType.Name(ttype.elem_type)
            raise UsageError(f"{what} {vi.name!r} has type {type_name}, which Triton has no data type for.")
        if not ttype.HasField("shape"):
            raise UsageError(f"{what} {vi.name!r} has no shape in the ONNX graph; run shape inference first.")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in ttype.shape.dim]
        if max_batch > 0:
            if not dims:
                raise UsageError(f"{what} {vi.name!r} is a scalar without a batch dim; use --max-batch 0.")
            if dims[0] != -1:
                raise UsageError(
                    f"{what} {vi.name!r} has a fixed first dim {dims[0]}, but max_batch={max_batch} needs a "
                    "dynamic batch dim; re-export with --dynamic-batch, or use --max-batch 0."
                )
            dims = dims[1:]
        tensors.append(TritonTensor(vi.name, _ONNX_TO_TRITON[ttype.elem_type], tuple(dims)))
    return tensors


def _tensor_block(kind: str, tensors: list[TritonTensor]) -> list[str]:
    lines = [f"{kind} ["]
    for i, t in enumerate(tensors):
        dims = ", ".join(str(d) for d in t.dims)
        sep = "," if i < len(tensors) - 1 else ""
        lines += [
            "  {",
            f"    name: {_quote(t.name)}",
            f"    data_type: {t.data_type}",
            f"    dims: [ {dims} ]",
            f"  }}{sep}",
        ]
    lines.append("]")
    return lines


def render_config(
    *,
    name: str,
    platform: Platform,
    max_batch: int,
    inputs: list[TritonTensor],
    outputs: list[TritonTensor],
    dynamic_batching: bool,
    preferred_batch_sizes: tuple[int, ...] = (),
    max_queue_delay_us: int = 0,
    instances: int,
    kind: Literal["cpu", "gpu", "auto"],
    trt_accelerator: bool,
    fp16: bool,
) -> str:
    """``config.pbtxt`` text; pure, so tests can parse it without touching the file system."""
    lines = [
        f"name: {_quote(name)}",
        f"platform: {_quote(TRITON_PLATFORMS[platform])}",
        f"max_batch_size: {max_batch}",
    ]
    lines += _tensor_block("input", inputs)
    lines += _tensor_block("output", outputs)
    if dynamic_batching:
        lines.append("dynamic_batching {")
        if preferred_batch_sizes:
            lines.append(f"  preferred_batch_size: [ {', '.join(str(b) for b in preferred_batch_sizes)} ]")
        if max_queue_delay_us:
            lines.append(f"  max_queue_delay_microseconds: {max_queue_delay_us}")
        lines.append("}")
    lines += ["instance_group [", "  {", f"    count: {instances}", f"    kind: KIND_{kind.upper()}"]
    lines += ["  }", "]"]
    if trt_accelerator:
        # The same option builder the verified ort-trt run used (fp16 → trt_layer_norm_fp32_fallback, …),
        # minus host cache paths: an engine cache would land in the server's working directory.
        from normfold.runtime.base import SessionOptions
        from normfold.runtime.onnxruntime_gpu import triton_trt_parameters

        params = triton_trt_parameters(SessionOptions(precision="fp16" if fp16 else "fp32"))
        lines += [
            "optimization {",
            "  execution_accelerators {",
            "    gpu_execution_accelerator: [",
            "      {",
            '        name: "tensorrt"',
        ]
        lines += [f"        parameters {{ key: {_quote(k)} value: {_quote(v)} }}" for k, v in params]
        lines += ["      }", "    ]", "  }", "}"]
    return "\n".join(lines) + "\n"


def validate_config(text: str) -> bool:
    """Parse ``text`` into Triton's ``ModelConfig``; False when tritonclient is not installed.

    Raises :class:`UsageError` when the text does not parse: that is a bug in the renderer or an
    unsupported name, and the message carries protobuf's line/column.
    """
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        logger.debug("tritonclient not installed; config.pbtxt not validated against ModelConfig")
        return False
    try:
        text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise UsageError(f"generated config.pbtxt does not parse as Triton's ModelConfig: {e}\n{text}") from e
    return True


def _build_plan(onnx_path: Path, *, fp16: bool, max_batch: int) -> Path:
    """Build a serialized engine with the ``trt`` backend (GPU + TensorRT needed; else the exact reason)."""
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
    )
    return build_engine(onnx_path, options).path


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
    name = name if name is not None else onnx_path.stem.split(".")[0]
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise UsageError(f"model name {name!r} is not a valid directory name; pass --name.")
    if platform not in TRITON_PLATFORMS:
        raise UsageError(f"platform {platform!r} is not one of {sorted(TRITON_PLATFORMS)}.")
    if kind not in ("auto", "cpu", "gpu"):
        raise UsageError(f"instance kind {kind!r} is not one of auto, cpu, gpu.")
    if max_batch < 0:
        raise UsageError(f"max_batch must be >= 0 (0 disables Triton batching), got {max_batch}.")
    if instances < 1:
        raise UsageError(f"instances must be >= 1, got {instances}.")
    if dynamic_batching and max_batch == 0:
        raise UsageError(
            "dynamic batching needs max_batch > 0 (Triton batches along the first dim); pass --max-batch N."
        )
    if (preferred_batch_sizes or max_queue_delay_us) and not dynamic_batching:
        raise UsageError("preferred batch sizes and queue delay only apply with dynamic batching.")
    bad = [b for b in preferred_batch_sizes if not 1 <= b <= max_batch]
    if bad:
        raise UsageError(f"preferred batch sizes {bad} are outside 1..max_batch ({max_batch}).")

    notes: list[str] = []
    if platform == "tensorrt":
        if trt_accelerator:
            raise UsageError(
                "the TensorRT accelerator is an ORT-backend option; the tensorrt platform "
                "already serves a TensorRT engine."
            )
        if fp16 and not (build_engine and engine_path is None):
            raise UsageError(
                "--fp16 has no meaning for a prebuilt plan: its precision was fixed when the "
                "engine was built; build the engine with fp16 and pass it as the engine."
            )
        if engine_path is None and build_engine:
            engine_path = _build_plan(Path(onnx_path), fp16=fp16, max_batch=max_batch)
            notes.append(f"built the TensorRT engine here ({'fp16' if fp16 else 'fp32'})")
        if engine_path is None:
            raise UsageError(
                "the tensorrt platform serves a serialized TensorRT engine (model.plan), and none was "
                "given; build one with the trt backend (normfold.runtime.tensorrt) and pass engine_path "
                "(CLI: --engine), or use --platform onnxruntime."
            )
        plan = Path(engine_path)
        if not plan.is_file() or plan.stat().st_size == 0:
            raise UsageError(f"engine {str(plan)!r} does not exist or is empty.")
        engine_file: Path | None = plan
        if kind == "cpu":
            raise UsageError("a TensorRT plan runs on GPU only; instance kind 'cpu' is impossible.")
        kind = "gpu"
    else:
        if engine_path is not None:
            raise UsageError("engine_path is only used with platform 'tensorrt'.")
        engine_file = None
        if fp16 and not trt_accelerator:
            trt_accelerator = True
            notes.append("fp16 on the onnxruntime platform enables the TensorRT accelerator (FP16).")
        if trt_accelerator:
            if kind == "cpu":
                raise UsageError("the TensorRT accelerator runs on GPU instances; use kind 'gpu' or 'auto'.")
            kind = "gpu"

    model = _load_graph_io(onnx_path)
    initializer_names = {t.name for t in model.graph.initializer}
    graph_inputs = [vi for vi in model.graph.input if vi.name not in initializer_names]
    inputs = _tensors(graph_inputs, max_batch, "input")
    outputs = _tensors(list(model.graph.output), max_batch, "output")

    text = render_config(
        name=name,
        platform=platform,
        max_batch=max_batch,
        inputs=inputs,
        outputs=outputs,
        dynamic_batching=dynamic_batching,
        preferred_batch_sizes=preferred_batch_sizes,
        max_queue_delay_us=max_queue_delay_us,
        instances=instances,
        kind=kind,
        trt_accelerator=trt_accelerator,
        fp16=fp16,
    )
    validated = validate_config(text)

    model_dir = repo_dir / name
    if model_dir.exists() and not model_dir.is_dir():
        raise UsageError(f"{str(model_dir)!r} exists and is not a directory.")
    if model_dir.is_dir() and any(model_dir.iterdir()) and not overwrite:
        raise UsageError(
            f"model directory {str(model_dir)!r} is not empty; pass overwrite=True (CLI: --overwrite) to replace it."
        )
    refs = resolve_external_data(model, onnx_path) if engine_file is None else []
    with atomic_dir(model_dir) as staging:
        version_dir = staging / VERSION
        version_dir.mkdir()
        model_filename = MODEL_FILENAMES[platform]
        shutil.copyfile(engine_file if engine_file is not None else onnx_path, version_dir / model_filename)
        for location in copy_external_data(refs, version_dir):
            notes.append(f"copied external data {location!r}")
        write_text(staging / "config.pbtxt", text)

    logger.info("wrote Triton model %s (%s) to %s", name, TRITON_PLATFORMS[platform], model_dir)
    return TritonRepoReport(
        repo_dir=repo_dir,
        model_dir=model_dir,
        model_file=model_dir / VERSION / MODEL_FILENAMES[platform],
        config_path=model_dir / "config.pbtxt",
        config_text=text,
        name=name,
        platform=TRITON_PLATFORMS[platform],
        max_batch=max_batch,
        inputs=inputs,
        outputs=outputs,
        validated_with_protobuf=validated,
        notes=notes,
    )
