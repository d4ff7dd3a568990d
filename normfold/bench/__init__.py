"""Latency measurement across backends: trustworthy statistics, baselines and plots."""

from normfold.bench.harness import benchmark
from normfold.bench.measure import Schedule, measure
from normfold.bench.plot import write_plot
from normfold.bench.regression import RegressionEntry, RegressionReport, check_regression
from normfold.bench.report import BenchReport, BenchResult
from normfold.bench.stats import LatencyStats, percentile, summarize

__all__ = [
    "BenchReport",
    "BenchResult",
    "LatencyStats",
    "RegressionEntry",
    "RegressionReport",
    "Schedule",
    "benchmark",
    "check_regression",
    "measure",
    "percentile",
    "summarize",
    "write_plot",
]
