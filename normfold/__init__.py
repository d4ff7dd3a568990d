"""normfold: take trained PyTorch models to production inference and prove nothing was lost.

The public API is listed in ``__all__``. Names resolve lazily, so ``import normfold`` stays cheap and a
missing optional stack (CUDA, TensorRT, Ray) never breaks it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from normfold._lazy import lazy_attributes

# What type checkers and IDEs see (``X as X`` marks a re-export); at run time names resolve in __getattr__.
if TYPE_CHECKING:
    from normfold.bench import BenchReport as BenchReport
    from normfold.bench import benchmark as benchmark
    from normfold.errors import NormfoldError as NormfoldError
    from normfold.exporter.export import ExportResult as ExportResult
    from normfold.exporter.export import export as export
    from normfold.fusers import OptimizeReport as OptimizeReport
    from normfold.fusers import optimize as optimize
    from normfold.gate import GateReport as GateReport
    from normfold.gate import run_gate as run_gate
    from normfold.models.loader import LoadedModel as LoadedModel
    from normfold.models.loader import load_model as load_model
    from normfold.numerics.compare import CompareReport as CompareReport
    from normfold.numerics.compare import compare as compare
    from normfold.numerics.tolerances import Tolerance as Tolerance
    from normfold.runtime.base import BackendStatus as BackendStatus
    from normfold.runtime.registry import list_backends as list_backends
    from normfold.serve import write_triton_repo as write_triton_repo

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


__getattr__, __dir__ = lazy_attributes("normfold", _EXPORTS, globals())
