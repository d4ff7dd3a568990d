"""Error metrics between one produced tensor and its reference.

``max_rel`` is taken only over elements whose reference magnitude exceeds ``atol`` (elsewhere relative
error is noise over zero). ``mismatch_fraction`` is the share of elements failing
``|a-b| <= atol + rtol·|b|``.

Non-finite values (NaN, ±Inf) are counted on each side (``nonfinite``, ``expected_nonfinite``). One on one
side only, or a different one on each side, always fails. The same one at the same place on both sides
also fails unless the tolerance allows it (``allow_nonfinite``): a NaN that both runtimes produce means the
inputs never exercised the model, which is not a pass.
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
    nonfinite: int = 0
    expected_nonfinite: int = 0
    #: The absolute tolerance actually applied when it was scaled by the tensor's magnitude (outputs).
    atol_eff: float | None = None

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"], d["expected_shape"] = list(self.shape), list(self.expected_shape)
        return d


def _finite(x: float) -> float:
    return float(x) if np.isfinite(x) else float("inf")


def _nonfinite_diff(
    a: np.ndarray, e: np.ndarray, tol: Tolerance
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int, int]]:
    """The slow path: the same NaN/Inf at the same place is "matching" (zeroed on both sides, and a
    mismatch unless ``allow_nonfinite``); anything else non-finite differs by ``inf``. Returns the
    cleaned arrays, ``|a-e|`` and the counts (non-finite in result, in reference, matching)."""
    a_bad, e_bad = ~np.isfinite(a), ~np.isfinite(e)
    nonfinite, expected_nonfinite = int(np.count_nonzero(a_bad)), int(np.count_nonzero(e_bad))
    same = (np.isnan(a) & np.isnan(e)) | (a_bad & e_bad & (a == e))
    matching_nonfinite = int(np.count_nonzero(same))
    a, e = np.where(same, 0.0, a), np.where(same, 0.0, e)
    with np.errstate(invalid="ignore"):
        diff = np.abs(a - e)
    diff = np.where(np.isnan(diff), np.inf, diff)
    if not tol.allow_nonfinite:
        diff = np.where(same, np.inf, diff)
    return a, e, diff, (nonfinite, expected_nonfinite, matching_nonfinite)


def _cosine_rel_l2(a: np.ndarray, e: np.ndarray, diff: np.ndarray) -> tuple[float, float]:
    """Cosine similarity and ``‖a-e‖/‖e‖`` with plain reductions, not BLAS dot/norm: those wake
    OpenBLAS threads, which costs milliseconds on a busy machine for what is a single pass here."""
    na, ne = float(np.sqrt(np.sum(a * a))), float(np.sqrt(np.sum(e * e)))
    if na == 0.0 and ne == 0.0:
        cosine = 1.0
    elif na == 0.0 or ne == 0.0 or not (np.isfinite(na) and np.isfinite(ne)):
        cosine = 0.0
    else:
        cosine = float(np.sum(a * e) / (na * ne))
    l2 = float(np.sqrt(np.sum(diff * diff)))
    return cosine, l2 / ne if ne > 0 else (0.0 if na == 0 else float("inf"))


def compare_tensors(name: str, actual: np.ndarray, expected: np.ndarray, tol: Tolerance) -> TensorMetrics:
    """All metrics of ``actual`` against the reference ``expected`` under ``tol``."""
    a_arr, e_arr = np.asarray(actual), np.asarray(expected)
    shape_ok = a_arr.shape == e_arr.shape
    dtype_ok = a_arr.dtype == e_arr.dtype
    common: dict[str, Any] = dict(
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
    nonfinite = expected_nonfinite = matching_nonfinite = 0
    if not (np.isfinite(a).all() and np.isfinite(e).all()):
        a, e, diff, (nonfinite, expected_nonfinite, matching_nonfinite) = _nonfinite_diff(a, e, tol)
    else:
        diff = np.abs(a - e)
    abs_e = np.abs(e)
    with np.errstate(invalid="ignore", over="ignore"):
        mismatch = float(np.count_nonzero(~(diff <= tol.atol + tol.rtol * abs_e))) / diff.size
        significant = abs_e > max(tol.atol, np.finfo(np.float64).tiny)
        max_rel = float((diff[significant] / abs_e[significant]).max()) if significant.any() else 0.0
        cosine, rel_l2 = _cosine_rel_l2(a, e, diff)
    reasons = []
    one_sided = max(nonfinite, expected_nonfinite) - matching_nonfinite
    if one_sided > 0:
        reasons.append(f"non-finite values differ ({nonfinite} in the result, {expected_nonfinite} in the reference)")
    if matching_nonfinite and not tol.allow_nonfinite:
        reasons.append(f"{matching_nonfinite} NaN/Inf on both sides (allow them explicitly with allow_nonfinite)")
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
        nonfinite=nonfinite,
        expected_nonfinite=expected_nonfinite,
    )
