"""normfold: take trained PyTorch models to production inference and prove nothing was lost.

The public API is listed in ``__all__``. Names resolve lazily, so ``import normfold`` stays cheap and a
missing optional stack (CUDA, TensorRT, Ray) never breaks it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "load_model": "normfold.models.loader",
    "LoadedModel": "normfold.models.loader",
    "export": "normfold.exporter.export",
    "ExportResult": "normfold.exporter.export",
    "optimize": "normfold.fusers",
    "OptimizeReport": "normfold.fusers",
    "compare": "normfold.numerics.compare",
    "CompareReport": "normfold.numerics.compare",
    "benchmark": "normfold.bench",
    "BenchReport": "normfold.bench",
    "run_gate": "normfold.gate",
    "GateReport": "normfold.gate",
    "write_triton_repo": "normfold.serve",
    "list_backends": "normfold.runtime.registry",
    "BackendStatus": "normfold.runtime.base",
    "Tolerance": "normfold.numerics.tolerances",
    "NormfoldError": "normfold.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'normfold' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
