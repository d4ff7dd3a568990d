"""Percentiles and the run summary against numpy/statistics references."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from normfold.bench.stats import (
    block_median_range,
    median_abs_deviation,
    median_standard_error,
    percentile,
    summarize,
)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101, 1000])
@pytest.mark.parametrize("q", [0.0, 1.0, 25.0, 50.0, 90.0, 95.0, 99.0, 100.0])
def test_percentile_matches_numpy_linear(n: int, q: float) -> None:
    values = sorted(np.random.default_rng(n).exponential(1.0, n).tolist())
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12, abs=1e-15)


def test_percentile_rejects_empty_and_out_of_range() -> None:
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)
    with pytest.raises(ValueError, match="within"):
        percentile([1.0], 101)


def test_summarize_known_values() -> None:
    samples_ns = [int(v * 1e6) for v in range(1, 101)]  # 1..100 ms, shuffled order must not matter
    samples_ns = samples_ns[50:] + samples_ns[:50]
    s = summarize(samples_ns, batch_size=4)
    ms = list(range(1, 101))
    assert s.iterations == 100
    assert (s.min_ms, s.max_ms) == (1.0, 100.0)
    assert s.p50_ms == pytest.approx(50.5)
    assert s.p90_ms == pytest.approx(float(np.percentile(ms, 90)))
    assert s.p99_ms == pytest.approx(float(np.percentile(ms, 99)))
    assert s.mean_ms == pytest.approx(50.5)
    assert s.std_ms == pytest.approx(statistics.stdev(ms))
    assert s.iqr_ms == pytest.approx(float(np.percentile(ms, 75) - np.percentile(ms, 25)))
    assert s.mad_ms == pytest.approx(25.0)
    # 4 samples per call, 100 calls in 5050 ms
    assert s.throughput == pytest.approx(4 * 100 / 5.050)
    assert s.min_ms <= s.p50_ms <= s.p90_ms <= s.p95_ms <= s.p99_ms <= s.max_ms


def test_summarize_single_sample_has_zero_std() -> None:
    s = summarize([2_000_000])
    assert s.std_ms == 0.0 and s.p50_ms == s.p99_ms == 2.0 and s.throughput == pytest.approx(500.0)


def test_summarize_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="no latency samples"):
        summarize([])
    with pytest.raises(ValueError, match="batch size"):
        summarize([1], batch_size=0)


def test_mad_ignores_one_outlier_where_std_does_not() -> None:
    calm = [10.0, 10.1, 9.9, 10.0, 10.2, 9.8, 10.0]
    spiky = sorted([*calm, 1000.0])
    assert median_abs_deviation(spiky) == pytest.approx(median_abs_deviation(sorted(calm)), abs=0.06)
    assert statistics.stdev(spiky) > 100 * statistics.stdev(calm)


def test_median_standard_error_formula() -> None:
    assert median_standard_error(2.0, 100) == pytest.approx(math.sqrt(math.pi / 2) * 2.0 / 10)
    assert median_standard_error(2.0, 0) == math.inf


def test_block_median_range_sees_a_level_shift_that_mad_does_not() -> None:
    steady = [1.0] * 100
    shifted = [1.0] * 70 + [1.5] * 30  # the machine got busy for the last 30% of the run
    assert block_median_range(steady) == 0.0
    assert block_median_range(shifted) == pytest.approx(0.5)
    assert median_abs_deviation(sorted(shifted)) == 0.0
    assert block_median_range([1.0, 2.0] * 9) == 0.0  # too short for two blocks of 10
    s = summarize([int(v * 1e6) for v in shifted])
    assert s.drift_ms == pytest.approx(0.5)
