"""Metrics, tolerances, and comparison of backends against eager."""

from normfold.numerics.compare import BackendComparison, CompareReport, compare
from normfold.numerics.metrics import TensorMetrics, compare_tensors
from normfold.numerics.tolerances import DEFAULT_TOLERANCES, Tolerance, tolerance_for

__all__ = [
    "DEFAULT_TOLERANCES",
    "BackendComparison",
    "CompareReport",
    "TensorMetrics",
    "Tolerance",
    "compare",
    "compare_tensors",
    "tolerance_for",
]
