"""Triton's ``config.pbtxt``: ONNX graph I/O → Triton tensors, the text, and its check against ``ModelConfig``.

With ``max_batch > 0`` Triton prepends the batch dimension itself, so the first dimension of every tensor
is stripped from ``dims``; that dimension must therefore be dynamic in the ONNX model (a fixed batch of 1
cannot be batched). The text is rendered here (no hard dependency on tritonclient) and, when tritonclient's
``model_config_pb2`` is importable, parsed back into Triton's real ``ModelConfig`` protobuf so a typo in a
field name fails at write time rather than at server start.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import onnx

from normfold.errors import UsageError

logger = logging.getLogger(__name__)

Platform = Literal["onnxruntime", "tensorrt"]
InstanceKind = Literal["auto", "cpu", "gpu"]

TRITON_PLATFORMS: dict[str, str] = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}

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


def graph_tensors(values: Iterable[onnx.ValueInfoProto], max_batch: int, what: str) -> list[TritonTensor]:
    """Triton's view of graph inputs or outputs; the exact reason when one cannot be served or batched."""
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
    kind: InstanceKind,
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
