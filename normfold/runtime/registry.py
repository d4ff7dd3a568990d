"""Backend names → backend objects, and availability listing."""

from __future__ import annotations

from collections.abc import Iterable

from normfold.errors import UnknownBackendError
from normfold.runtime.base import Backend, BackendStatus
from normfold.runtime.eager import TorchBackend
from normfold.runtime.onnxruntime import OrtCpuBackend
from normfold.runtime.onnxruntime_gpu import OrtCudaBackend, OrtTensorrtBackend
from normfold.runtime.tensorrt import TensorrtBackend

BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    BACKENDS[backend.name] = backend
    return backend


for _backend in (TorchBackend(), OrtCpuBackend(), OrtCudaBackend(), OrtTensorrtBackend(), TensorrtBackend()):
    register_backend(_backend)

# Order users see in `normfold backends`.
BACKEND_ORDER: tuple[str, ...] = ("torch", "ort-cpu", "ort-cuda", "ort-trt", "trt")


def get_backend(name: str) -> Backend:
    """The backend called ``name``; unknown names raise :class:`UnknownBackendError` listing valid ones."""
    try:
        return BACKENDS[name]
    except KeyError:
        known = ", ".join(n for n in BACKEND_ORDER if n in BACKENDS)
        raise UnknownBackendError(f"unknown backend {name!r}; expected one of: {known}") from None


def parse_backends(spec: str | Iterable[str]) -> list[str]:
    """``"ort-cpu,trt"`` or a list → validated names, order kept, duplicates dropped."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for raw in items:
        name = raw.strip()
        if not name:
            continue
        get_backend(name)
        if name not in names:
            names.append(name)
    if not names:
        raise UnknownBackendError("no backend given; expected a comma-separated list such as ort-cpu,torch")
    return names


def list_backends() -> list[BackendStatus]:
    """Every known backend with whether it can run here and, if not, exactly why."""
    ordered = [n for n in BACKEND_ORDER if n in BACKENDS] + sorted(set(BACKENDS) - set(BACKEND_ORDER))
    return [BACKENDS[n].status() for n in ordered]
