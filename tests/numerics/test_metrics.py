"""Metrics and tolerances: each metric against a hand-computed value."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from normfold.errors import UsageError
from normfold.numerics import DEFAULT_TOLERANCES, Tolerance, compare_tensors, tolerance_for

TOL = Tolerance(atol=1e-5, rtol=1e-4)


def test_identical_tensors_pass_with_zero_error() -> None:
    a = np.linspace(-1, 1, 100, dtype=np.float32)
    m = compare_tensors("y", a, a.copy(), TOL)
    assert m.passed and bool(m)
    assert (m.max_abs, m.max_rel, m.rel_l2, m.mismatch_fraction) == (0.0, 0.0, 0.0, 0.0)
    assert m.cosine == pytest.approx(1.0)


def test_metrics_values() -> None:
    ref = np.array([1.0, 2.0, -4.0, 0.0], dtype=np.float32)
    got = np.array([1.0, 2.002, -4.0, 1e-6], dtype=np.float32)
    m = compare_tensors("y", got, ref, TOL)
    assert m.max_abs == pytest.approx(0.002, rel=1e-3)
    assert m.max_rel == pytest.approx(0.001, rel=1e-3)  # the zero reference is excluded from max_rel
    assert m.mismatch_fraction == pytest.approx(0.25)  # only 2.002 exceeds 1e-5 + 1e-4·2
    assert not m.passed and "25.00%" in m.reason
    assert m.rel_l2 == pytest.approx(np.linalg.norm(got - ref) / np.linalg.norm(ref), rel=1e-3)


def test_fold_sized_noise_passes_and_one_percent_fault_fails() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal(10_000).astype(np.float32)
    folded = ref * (1 + rng.uniform(-2e-6, 2e-6, ref.shape)).astype(np.float32)
    assert compare_tensors("y", folded, ref, DEFAULT_TOLERANCES["fp32"]).passed
    faulty = ref * np.float32(1.01)
    assert not compare_tensors("y", faulty, ref, DEFAULT_TOLERANCES["fp32"]).passed


def test_shape_dtype_and_nan() -> None:
    ref = np.zeros((2, 3), np.float32)
    assert "shape" in compare_tensors("y", np.zeros((3, 2), np.float32), ref, TOL).reason
    assert not compare_tensors("y", np.zeros((2, 3), np.float64), ref, TOL).passed
    nan = ref.copy()
    nan[0, 0] = np.nan
    assert not compare_tensors("y", nan, ref, TOL).passed
    # NaN where the reference has NaN: the inputs never exercised that element, so it fails unless allowed.
    both = compare_tensors("y", nan, nan.copy(), TOL)
    assert not both.passed and "NaN/Inf on both sides" in both.reason
    assert (both.nonfinite, both.expected_nonfinite) == (1, 1)
    assert compare_tensors("y", nan, nan.copy(), dataclasses.replace(TOL, allow_nonfinite=True)).passed


@pytest.mark.parametrize(
    ("actual", "expected", "allowed_passes"),
    [
        ([np.nan, 1.0], [1.0, 1.0], False),  # one side only
        ([1.0, 1.0], [np.nan, 1.0], False),
        ([np.inf, 1.0], [-np.inf, 1.0], False),  # different infinities
        ([np.nan, 1.0], [np.inf, 1.0], False),
        ([np.inf, 1.0], [np.inf, 1.0], True),  # the same infinity at the same place
        ([np.nan, np.nan], [np.nan, np.nan], True),
    ],
)
def test_nonfinite_values_are_counted_and_judged(
    actual: list[float], expected: list[float], allowed_passes: bool
) -> None:
    a, e = np.array(actual, np.float32), np.array(expected, np.float32)
    strict = compare_tensors("y", a, e, TOL)
    assert not strict.passed  # never a silent pass, whatever the values
    assert strict.nonfinite == int((~np.isfinite(a)).sum()) and strict.expected_nonfinite == int(
        (~np.isfinite(e)).sum()
    )
    allowed = compare_tensors("y", a, e, dataclasses.replace(TOL, allow_nonfinite=True))
    assert allowed.passed is allowed_passes
    if not allowed_passes:
        assert "non-finite values differ" in allowed.reason


def test_cosine_floor_applies_for_low_precision() -> None:
    ref = np.ones(10, np.float32)
    flipped = ref.copy()
    flipped[:5] = -1
    m = compare_tensors("y", flipped, ref, Tolerance(atol=10, rtol=0, min_cosine=0.999))
    assert not m.passed and "cosine" in m.reason


def test_tolerance_for_overrides_and_validates() -> None:
    assert tolerance_for("fp32") == DEFAULT_TOLERANCES["fp32"]
    t = tolerance_for("fp16", atol=0.5)
    assert (t.atol, t.rtol, t.min_cosine) == (0.5, 1e-2, 0.999)
    with pytest.raises(UsageError, match="unknown precision"):
        tolerance_for("fp8")
    with pytest.raises(UsageError, match="non-negative"):
        tolerance_for("fp32", atol=-1)
