"""Typed gate results for the writer and baseline tests: real numerics report objects, no dicts."""

from __future__ import annotations

from normfold.numerics.metrics import TensorMetrics


def metrics(max_abs: float, passed: bool = True, name: str = "y") -> TensorMetrics:
    """An output's metrics as numerics reports them (a failing one has a quarter of its elements out)."""
    return TensorMetrics(
        name=name,
        shape=(2, 8),
        expected_shape=(2, 8),
        dtype="float32",
        expected_dtype="float32",
        shape_ok=True,
        dtype_ok=True,
        max_abs=max_abs,
        mean_abs=max_abs / 3,
        max_rel=max_abs * 10,
        cosine=0.99 if not passed else 1.0,
        rel_l2=max_abs,
        mismatch_fraction=0.0 if passed else 0.25,
        atol=1e-5,
        rtol=1e-4,
        passed=passed,
        reason="" if passed else "25.00% of elements exceed atol+rtol·|ref|",
    )
