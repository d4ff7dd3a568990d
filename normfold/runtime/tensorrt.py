"""Native TensorRT through Polygraphy (the ``trt`` backend). Imports are lazy: TensorRT is optional."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from normfold.errors import BackendUnavailableError
from normfold.runtime.base import Backend, Runner, SessionOptions
from normfold.runtime.probe import gpu_reason

INSTALL_HINT = "pip install 'normfold[tensorrt]'"


def tensorrt_reason() -> str | None:
    """None when tensorrt and polygraphy import and a GPU is visible; else why not."""
    missing = [m for m in ("tensorrt", "polygraphy") if importlib.util.find_spec(m) is None]
    no_gpu = gpu_reason()
    if missing:
        why = f"{' and '.join(missing)} not installed ({INSTALL_HINT})"
        return f"{no_gpu}; {why}" if no_gpu else why
    if no_gpu:
        return no_gpu
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # a broken install raises ImportError or OSError from the loader
        return f"tensorrt is installed but failed to import: {type(e).__name__}: {e}"
    return None


class TensorrtBackend(Backend):
    name = "trt"
    description = "native TensorRT engine built through Polygraphy"
    precisions = ("fp32", "fp16", "bf16")

    def probe(self) -> str | None:
        return tensorrt_reason()

    def load(self, onnx_path: str | Path, options: SessionOptions | None = None) -> Runner:
        self.ensure_available((options or SessionOptions()).precision)
        raise BackendUnavailableError("backend 'trt': engine building is not implemented in this build")
