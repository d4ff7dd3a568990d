"""Noise-aware baseline comparison: what counts as a regression and what is noise."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from normfold.bench.regression import (
    classify,
    compare_rows,
    load_baseline,
    noise_band_ms,
    parse_fraction,
    robust_sigma,
)
from normfold.errors import UsageError


def row(p50: float, mad: float = 0.01, n: int = 200, backend: str = "ort-cpu", batch: int = 1, **extra: Any) -> dict:
    return {"backend": backend, "batch_size": batch, "p50_ms": p50, "mad_ms": mad, "iterations": n, **extra}


@pytest.mark.parametrize(
    ("text", "expected"),
    [("10%", 0.10), ("2.5%", 0.025), ("0.1", 0.1), ("10", 0.10), (0.2, 0.2), ("0", 0.0), (" 15 % ", 0.15)],
)
def test_parse_fraction(text: str | float, expected: float) -> None:
    assert parse_fraction(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["ten", "-5%", "nan", ""])
def test_parse_fraction_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="max-regression"):
        parse_fraction(text)


def test_clear_slowdown_with_tight_spread_is_a_regression() -> None:
    e = classify(row(1.0), row(1.3), max_regression=0.10)
    assert e.status == "regressed"
    assert e.change == pytest.approx(0.30) and e.shift_ms == pytest.approx(0.3)
    assert e.noise_ms is not None and e.noise_ms < 0.3


def test_same_shift_on_a_jittery_machine_is_noise() -> None:
    # 30% slower at p50, but single calls scatter by 0.4 ms (MAD) in both runs
    e = classify(row(1.0, mad=0.4), row(1.3, mad=0.4), max_regression=0.10)
    assert e.status == "noise"
    assert e.noise_ms is not None and e.noise_ms > 0.3


def test_few_iterations_widen_the_band() -> None:
    many = noise_band_ms(row(1.0, mad=0.05, n=10_000), row(1.0, mad=0.05, n=10_000))
    few = noise_band_ms(row(1.0, mad=0.05, n=3), row(1.0, mad=0.05, n=3))
    assert few > many
    # with many samples the floor is the two MADs
    assert many == pytest.approx(0.10)


def test_small_moves_are_unchanged_and_speedups_are_improvements() -> None:
    assert classify(row(1.0), row(1.05), 0.10).status == "unchanged"
    assert classify(row(1.0), row(0.5), 0.10).status == "improved"
    assert classify(row(1.0, mad=0.6), row(0.5, mad=0.6), 0.10).status == "noise"


def test_robust_sigma_falls_back_to_iqr_then_std() -> None:
    assert robust_sigma({"mad_ms": 1.0}) == pytest.approx(1.4826)
    assert robust_sigma({"iqr_ms": 1.349}) == pytest.approx(1.0)
    assert robust_sigma({"std_ms": 0.5}) == pytest.approx(0.5)
    assert robust_sigma({}) == 0.0


def test_compare_rows_reports_new_missing_and_setting_changes() -> None:
    base = [row(1.0, batch=1, options={"intra_op_threads": 2}), row(2.0, batch=8)]
    now = [row(1.0, batch=1, options={"intra_op_threads": 4}), row(1.0, batch=32)]
    entries, warnings = compare_rows(base, now, 0.10)
    status = {(e.backend, e.batch_size): e.status for e in entries}
    assert status == {("ort-cpu", 1): "unchanged", ("ort-cpu", 32): "new", ("ort-cpu", 8): "missing"}
    assert len(warnings) == 1 and "intra_op_threads" in warnings[0]


def test_zero_baseline_p50_cannot_divide_by_zero() -> None:
    e = classify(row(0.0, mad=0.0), row(1.0, mad=0.0), 0.10)
    assert e.change == math.inf and e.status == "regressed"


def test_load_baseline_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        load_baseline(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UsageError, match="not readable JSON"):
        load_baseline(bad)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"backends": []}))
    with pytest.raises(UsageError, match="no 'results' list"):
        load_baseline(other)
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"results": [{"backend": "ort-cpu", "batch_size": 1}]}))
    with pytest.raises(UsageError, match=r"results\[0\] lacks p50_ms, iterations"):
        load_baseline(partial)


def test_drift_within_either_run_widens_the_band() -> None:
    calm = classify(row(1.0, mad=0.01), row(1.3, mad=0.01), 0.10)
    drifting = classify(row(1.0, mad=0.01, drift_ms=0.4), row(1.3, mad=0.01), 0.10)
    assert calm.status == "regressed"
    assert drifting.status == "noise" and drifting.noise_ms == pytest.approx(0.4)
