"""Latency statistics: percentiles and a summary of one measured run (pure functions).

Why percentiles and not just a mean: latency distributions are right-skewed (a scheduler hiccup, a page
fault, a GC pause), so a mean hides the tail users feel. The summary therefore reports min, p50, p90, p95,
p99 and max alongside mean and standard deviation, plus two robust spreads (IQR and MAD) that the baseline
comparison uses as its noise estimate.

Percentiles use linear interpolation between closest ranks (numpy's default, Hyndman-Fan type 7):
for sorted samples ``x[0..n-1]`` and ``q`` in [0, 100], ``h = (n-1)·q/100`` and
``P(q) = x[⌊h⌋] + (h-⌊h⌋)·(x[⌊h⌋+1] - x[⌊h⌋])``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

#: Scale that turns a median absolute deviation into a standard-deviation estimate for normal data.
MAD_TO_SIGMA = 1.4826
#: Asymptotic standard error of a sample median is ``√(π/2)·σ/√n``; this is ``√(π/2)``.
MEDIAN_SE_FACTOR = math.sqrt(math.pi / 2)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of already sorted values, linearly interpolated (type 7)."""
    if not sorted_values:
        raise ValueError("percentile of an empty sample")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be within [0, 100], got {q}")
    n = len(sorted_values)
    h = (n - 1) * q / 100.0
    lo = math.floor(h)
    hi = min(lo + 1, n - 1)
    return float(sorted_values[lo] + (h - lo) * (sorted_values[hi] - sorted_values[lo]))


def median_abs_deviation(sorted_values: Sequence[float], median: float | None = None) -> float:
    """Median of ``|x - median(x)|``: a spread that one outlier cannot move."""
    med = percentile(sorted_values, 50.0) if median is None else median
    return percentile(sorted(abs(v - med) for v in sorted_values), 50.0)


def median_standard_error(sigma: float, n: int) -> float:
    """Standard error of a sample median: ``√(π/2)·σ/√n`` (normal approximation; σ e.g. 1.4826·MAD)."""
    if n <= 0:
        return math.inf
    return MEDIAN_SE_FACTOR * sigma / math.sqrt(n)


@dataclass(frozen=True)
class LatencyStats:
    """Steady-state latency of one (backend, batch size) in milliseconds, plus samples/s throughput."""

    iterations: int
    min_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    std_ms: float
    p25_ms: float
    p75_ms: float
    iqr_ms: float
    mad_ms: float
    total_ms: float
    throughput: float
    drift_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Consecutive blocks the run is cut into for :func:`block_median_range`, and the fewest samples per block.
DRIFT_BLOCKS = 10
MIN_BLOCK = 10


def block_median_range(samples_in_order: Sequence[float], blocks: int = DRIFT_BLOCKS) -> float:
    """Range (max − min) of the medians of consecutive blocks of a run, in the samples' unit.

    Measures *drift*: load from other processes or frequency changes move the whole latency level for a
    while, which per-call spread (MAD) and the median's sampling error cannot see. 0 when the run is too
    short to cut into at least two blocks of :data:`MIN_BLOCK` samples.
    """
    k = min(blocks, len(samples_in_order) // MIN_BLOCK)
    if k < 2:
        return 0.0
    n = len(samples_in_order)
    medians = [percentile(sorted(samples_in_order[i * n // k : (i + 1) * n // k]), 50.0) for i in range(k)]
    return max(medians) - min(medians)


def summarize(samples_ns: Sequence[int], batch_size: int = 1) -> LatencyStats:
    """Summarize per-iteration latencies (nanoseconds, from ``perf_counter_ns``) of one run.

    ``std_ms`` is the sample standard deviation (n-1 in the denominator; 0 for a single sample).
    ``throughput`` is samples per second over the measured time: ``batch·n / Σ latency``, i.e.
    ``batch·1000 / mean_ms``; it excludes warm-up and the first run. ``drift_ms`` is
    :func:`block_median_range` of the samples in the order they were taken.
    """
    if not samples_ns:
        raise ValueError("no latency samples to summarize")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    in_order = [s / 1e6 for s in samples_ns]
    ms = sorted(in_order)
    n = len(ms)
    total = math.fsum(ms)
    mean = total / n
    var = math.fsum((v - mean) ** 2 for v in ms) / (n - 1) if n > 1 else 0.0
    p25, p50, p75 = percentile(ms, 25.0), percentile(ms, 50.0), percentile(ms, 75.0)
    return LatencyStats(
        iterations=n,
        min_ms=ms[0],
        p50_ms=p50,
        p90_ms=percentile(ms, 90.0),
        p95_ms=percentile(ms, 95.0),
        p99_ms=percentile(ms, 99.0),
        max_ms=ms[-1],
        mean_ms=mean,
        std_ms=math.sqrt(var),
        p25_ms=p25,
        p75_ms=p75,
        iqr_ms=p75 - p25,
        mad_ms=median_abs_deviation(ms, p50),
        total_ms=total,
        throughput=batch_size * n / (total / 1e3) if total > 0 else math.inf,
        drift_ms=block_median_range(in_order),
    )
