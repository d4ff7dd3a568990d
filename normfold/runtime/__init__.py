"""Backends: torch (eager reference), ort-cpu, ort-cuda, ort-trt, trt."""

from normfold.runtime.base import Backend, BackendStatus, Runner, SessionOptions, TensorMeta
from normfold.runtime.registry import BACKENDS, get_backend, list_backends, parse_backends

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendStatus",
    "Runner",
    "SessionOptions",
    "TensorMeta",
    "get_backend",
    "list_backends",
    "parse_backends",
]
