"""Error metrics between one produced tensor and its reference.

``max_rel`` is taken only over elements whose reference magnitude exceeds ``atol`` (elsewhere relative
error is noise over zero). ``mismatch_fraction`` is the share of elements failing
``|a-b| <= atol + rtol·|b|``. NaNs count as mismatches unless both sides are NaN at the same place.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from normfold.numerics.tolerances import Tolerance


@dataclass(frozen=True)
class TensorMetrics:
    """How one tensor compares with its reference; truthy when it passed (like Polygraphy's results)."""

    name: str
    shape: tuple[int, ...]
    expected_shape: tuple[int, ...]
    dtype: str
    expected_dtype: str
    shape_ok: bool
    dtype_ok: bool
    max_abs: float
    mean_abs: float
    max_rel: float
    cosine: float
    rel_l2: float
    mismatch_fraction: float
    atol: float
    rtol: float
    passed: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"], d["expected_shape"] = list(self.shape), list(self.expected_shape)
        return d


def _finite(x: float) -> float:
    return float(x) if np.isfinite(x) else float("inf")


def compare_tensors(name: str, actual: np.ndarray, expected: np.ndarray, tol: Tolerance) -> TensorMetrics:
    """All metrics of ``actual`` against the reference ``expected`` under ``tol``."""
    a_arr, e_arr = np.asarray(actual), np.asarray(expected)
    shape_ok = a_arr.shape == e_arr.shape
    dtype_ok = a_arr.dtype == e_arr.dtype
    common = dict(
        name=name,
        shape=tuple(a_arr.shape),
        expected_shape=tuple(e_arr.shape),
        dtype=str(a_arr.dtype),
        expected_dtype=str(e_arr.dtype),
        shape_ok=shape_ok,
        dtype_ok=dtype_ok,
        atol=tol.atol,
        rtol=tol.rtol,
    )
    if not shape_ok:
        inf = float("inf")
        return TensorMetrics(
            **common,
            max_abs=inf,
            mean_abs=inf,
            max_rel=inf,
            cosine=0.0,
            rel_l2=inf,
            mismatch_fraction=1.0,
            passed=False,
            reason=f"shape {tuple(a_arr.shape)} != expected {tuple(e_arr.shape)}",
        )
    a = a_arr.astype(np.float64, copy=False).ravel()
    e = e_arr.astype(np.float64, copy=False).ravel()
    if a.size == 0:
        return TensorMetrics(
            **common,
            max_abs=0.0,
            mean_abs=0.0,
            max_rel=0.0,
            cosine=1.0,
            rel_l2=0.0,
            mismatch_fraction=0.0,
            passed=dtype_ok,
            reason="" if dtype_ok else f"dtype {a_arr.dtype} != expected {e_arr.dtype}",
        )
    if not (np.isfinite(a).all() and np.isfinite(e).all()):
        # Slow path: NaN equals NaN at the same place; any other non-finite difference is a mismatch.
        both_nan = np.isnan(a) & np.isnan(e)
        a, e = np.where(both_nan, 0.0, a), np.where(both_nan, 0.0, e)
        with np.errstate(invalid="ignore"):
            diff = np.abs(a - e)
        diff = np.where(np.isnan(diff), np.inf, diff)
    else:
        diff = np.abs(a - e)
    abs_e = np.abs(e)
    with np.errstate(invalid="ignore", over="ignore"):
        mismatch = float(np.count_nonzero(~(diff <= tol.atol + tol.rtol * abs_e))) / diff.size
        significant = abs_e > max(tol.atol, np.finfo(np.float64).tiny)
        max_rel = float((diff[significant] / abs_e[significant]).max()) if significant.any() else 0.0
        # Plain reductions, not BLAS dot/norm: those wake OpenBLAS threads, which costs milliseconds
        # on a busy machine for what is a single pass here.
        na, ne = float(np.sqrt(np.sum(a * a))), float(np.sqrt(np.sum(e * e)))
        if na == 0.0 and ne == 0.0:
            cosine = 1.0
        elif na == 0.0 or ne == 0.0 or not (np.isfinite(na) and np.isfinite(ne)):
            cosine = 0.0
        else:
            cosine = float(np.sum(a * e) / (na * ne))
        l2 = float(np.sqrt(np.sum(diff * diff)))
        rel_l2 = l2 / ne if ne > 0 else (0.0 if na == 0 else float("inf"))
    reasons = []
    if not dtype_ok:
        reasons.append(f"dtype {a_arr.dtype} != expected {e_arr.dtype}")
    if mismatch > 0:
        reasons.append(f"{mismatch:.2%} of elements exceed atol+rtol·|ref|")
    if tol.min_cosine is not None and cosine < tol.min_cosine:
        reasons.append(f"cosine {cosine:.6f} < {tol.min_cosine}")
    return TensorMetrics(
        **common,
        max_abs=_finite(diff.max()),
        mean_abs=_finite(diff.mean()),
        max_rel=_finite(max_rel),
        cosine=cosine,
        rel_l2=_finite(rel_l2),
        mismatch_fraction=mismatch,
        passed=not reasons,
        reason="; ".join(reasons),
    )
