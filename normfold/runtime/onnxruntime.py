"""ONNX Runtime backends. ``ort-cpu`` lives here; the GPU providers subclass :class:`OrtBackend`.

``onnxruntime`` is imported lazily so that a broken GPU stack never breaks ``import normfold``.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from normfold.errors import BackendUnavailableError, OnnxLoadError, UsageError
from normfold.runtime.base import Backend, Runner, SessionOptions, TensorMeta
from normfold.runtime.probe import capture_native_stderr, ort_provider_reason

if TYPE_CHECKING:
    from onnx import ModelProto

log = logging.getLogger(__name__)

_ORT_TYPES: dict[str, np.dtype] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(bool)": np.dtype(np.bool_),
}

GRAPH_OPT_LEVELS = ("disable", "basic", "extended", "layout", "all")


def _graph_opt_level(name: str) -> Any:
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if hasattr(ort.GraphOptimizationLevel, "ORT_ENABLE_LAYOUT"):
        levels["layout"] = ort.GraphOptimizationLevel.ORT_ENABLE_LAYOUT
    if name not in levels:
        raise UsageError(f"unknown graph optimization level {name!r}; expected one of {', '.join(levels)}")
    return levels[name]


def make_session_options(options: SessionOptions) -> Any:
    """Translate normfold's :class:`SessionOptions` into ``onnxruntime.SessionOptions``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = _graph_opt_level(options.graph_optimization_level)
    if options.intra_op_threads is not None:
        so.intra_op_num_threads = options.intra_op_threads
    if options.inter_op_threads is not None:
        so.inter_op_num_threads = options.inter_op_threads
    so.log_severity_level = 3
    return so


def create_session(
    model: str | Path | bytes,
    providers: list[str] | list[tuple[str, dict[str, Any]]],
    options: SessionOptions | None = None,
) -> Any:
    """Create an ``InferenceSession``; ORT's own load errors become :class:`OnnxLoadError`."""
    import onnxruntime as ort

    opts = options or SessionOptions()
    src = str(model) if isinstance(model, Path) else model
    if isinstance(src, str) and not Path(src).exists():
        raise OnnxLoadError(f"ONNX file not found: {src}")
    with capture_native_stderr() as native, contextlib.redirect_stdout(io.StringIO()):
        try:
            return ort.InferenceSession(src, sess_options=make_session_options(opts), providers=providers)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            where = f"{src}" if isinstance(src, str) else "model"
            raise OnnxLoadError(f"onnxruntime could not load {where}: {msg}") from e
        finally:
            for line in native:
                log.debug("onnxruntime: %s", line)


def tensor_metas(args: list[Any]) -> list[TensorMeta]:
    """NodeArg list (``session.get_inputs()``) → :class:`TensorMeta` list."""
    return [TensorMeta(a.name, tuple(a.shape), _ORT_TYPES.get(a.type, np.dtype(np.float32))) for a in args]


class OrtRunner(Runner):
    """Runs an ORT session; on the CPU provider there are no host↔device copies to account for."""

    def __init__(self, session: Any, backend: str, copies_included: bool = False) -> None:
        super().__init__(tensor_metas(session.get_inputs()), tensor_metas(session.get_outputs()))
        self.session = session
        self.backend = backend
        self.copies_included = copies_included

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = self.output_names
        values = self.session.run(names, feeds)
        return dict(zip(names, values, strict=True))

    def close(self) -> None:
        self.session = None


class OrtBackend(Backend):
    """An ONNX Runtime execution provider as a backend."""

    provider: ClassVar[str]

    def probe(self) -> str | None:
        return ort_provider_reason(self.provider)

    def provider_options(self, options: SessionOptions) -> dict[str, Any]:
        """Provider options for this EP (subclasses add cache dirs, fp16 flags, ...)."""
        return dict(options.provider_options)

    def check_providers(self, session: Any) -> None:
        """A session that silently fell back to another provider is an error, never a result."""
        got = session.get_providers()
        if not got or got[0] != self.provider:
            raise BackendUnavailableError(
                f"backend {self.name!r}: the session fell back to {got} instead of {self.provider}"
            )

    def load(self, onnx_path: str | Path, options: SessionOptions | None = None) -> OrtRunner:
        return self._runner(Path(onnx_path), options)

    def _runner(self, src: Path | bytes, options: SessionOptions | None) -> OrtRunner:
        opts = options or SessionOptions()
        self.ensure_available(opts.precision)
        session = create_session(src, [(self.provider, self.provider_options(opts))], opts)
        self.check_providers(session)
        return OrtRunner(session, self.name)


class OrtCpuBackend(OrtBackend):
    """ORT's CPU provider runs the file as it is: fp16/bf16 select the tolerances for a model that was
    already converted (``normfold convert``); nothing is converted on the fly."""

    name = "ort-cpu"
    description = "ONNX Runtime, CPU execution provider"
    provider = "CPUExecutionProvider"
    precisions = ("fp32", "fp16", "bf16")

    def load(self, onnx_path: str | Path | bytes | ModelProto, options: SessionOptions | None = None) -> OrtRunner:
        """Also takes serialized model bytes or an in-memory ``onnx.ModelProto`` (no file round trip)."""
        if isinstance(onnx_path, str | Path):
            return super().load(onnx_path, options)
        data = onnx_path if isinstance(onnx_path, bytes) else onnx_path.SerializeToString()
        return self._runner(data, options)


class OrtCudaBackend(OrtBackend):
    name = "ort-cuda"
    description = "ONNX Runtime, CUDA execution provider"
    provider = "CUDAExecutionProvider"
    precisions = ("fp32", "fp16", "bf16")


class OrtTensorrtBackend(OrtBackend):
    name = "ort-trt"
    description = "ONNX Runtime, TensorRT execution provider"
    provider = "TensorrtExecutionProvider"
    precisions = ("fp32", "fp16", "bf16")
