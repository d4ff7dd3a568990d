"""Backends: torch (eager reference), ort-cpu, ort-cuda, ort-trt, trt.

Names resolve lazily: the registry imports every backend module (torch with the eager one), and a
submodule import such as :mod:`normfold.runtime.probe` (which every CLI command makes) should not pay for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from normfold._lazy import lazy_attributes

if TYPE_CHECKING:
    from normfold.runtime.base import Backend as Backend
    from normfold.runtime.base import BackendStatus as BackendStatus
    from normfold.runtime.base import Runner as Runner
    from normfold.runtime.base import SessionOptions as SessionOptions
    from normfold.runtime.base import TensorMeta as TensorMeta
    from normfold.runtime.registry import BACKENDS as BACKENDS
    from normfold.runtime.registry import get_backend as get_backend
    from normfold.runtime.registry import list_backends as list_backends
    from normfold.runtime.registry import parse_backends as parse_backends

_EXPORTS: dict[str, str] = {
    "Backend": "normfold.runtime.base",
    "BackendStatus": "normfold.runtime.base",
    "Runner": "normfold.runtime.base",
    "SessionOptions": "normfold.runtime.base",
    "TensorMeta": "normfold.runtime.base",
    "BACKENDS": "normfold.runtime.registry",
    "get_backend": "normfold.runtime.registry",
    "list_backends": "normfold.runtime.registry",
    "parse_backends": "normfold.runtime.registry",
}

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


__getattr__, __dir__ = lazy_attributes("normfold.runtime", _EXPORTS, globals())
