"""Benchmark report objects: one :class:`BenchResult` per (backend, batch size) and the whole run.

The JSON form (``BenchReport.to_dict()``) is what ``--json`` writes and what ``--baseline`` reads back:
a ``results`` list whose entries carry ``backend``, ``batch_size``, ``first_run_ms``, ``min_ms``,
``p50_ms``, ``p90_ms``, ``p95_ms``, ``p99_ms``, ``max_ms``, ``mean_ms``, ``std_ms``, ``throughput``,
``iterations``, ``copies_included`` and ``options``, plus the spreads the regression check
needs (``iqr_ms``, ``mad_ms``, ``drift_ms``), and an ``environment`` block describing the machine and thread settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from normfold.bench.stats import LatencyStats

if TYPE_CHECKING:
    from normfold.bench.regression import RegressionReport

SCHEMA = "normfold.bench/1"


@dataclass
class BenchResult:
    """Latency of one backend at one batch size.

    ``first_run_ms`` is session creation (or engine build, or ``torch.compile``) plus the first
    inference, reported on its own and never part of the steady-state statistics; ``load_ms`` and
    ``first_infer_ms`` split it. ``copies_included`` says whether the timed call includes host↔device
    copies (it comes from the backend's runner; always False on CPU).
    """

    backend: str
    batch_size: int
    first_run_ms: float
    load_ms: float
    first_infer_ms: float
    stats: LatencyStats
    copies_included: bool
    options: dict[str, Any] = field(default_factory=dict)
    warmup_iterations: int = 0
    warmup_ms: float = 0.0
    samples_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def p50_ms(self) -> float:
        return self.stats.p50_ms

    @property
    def key(self) -> tuple[str, int]:
        return (self.backend, self.batch_size)

    def to_dict(self, include_samples: bool = False) -> dict[str, Any]:
        s = self.stats
        row: dict[str, Any] = {
            "backend": self.backend,
            "batch_size": self.batch_size,
            "first_run_ms": self.first_run_ms,
            "load_ms": self.load_ms,
            "first_infer_ms": self.first_infer_ms,
            "min_ms": s.min_ms,
            "p50_ms": s.p50_ms,
            "p90_ms": s.p90_ms,
            "p95_ms": s.p95_ms,
            "p99_ms": s.p99_ms,
            "max_ms": s.max_ms,
            "mean_ms": s.mean_ms,
            "std_ms": s.std_ms,
            "p25_ms": s.p25_ms,
            "p75_ms": s.p75_ms,
            "iqr_ms": s.iqr_ms,
            "mad_ms": s.mad_ms,
            "drift_ms": s.drift_ms,
            "throughput": s.throughput,
            "iterations": s.iterations,
            "warmup_iterations": self.warmup_iterations,
            "warmup_ms": self.warmup_ms,
            "copies_included": self.copies_included,
            "options": dict(self.options),
        }
        if include_samples:
            row["samples_ms"] = list(self.samples_ms)
        return row


@dataclass
class BenchReport:
    """A whole benchmark run: settings, environment, results and (with a baseline) the regression check."""

    onnx_path: str
    model: str | None
    schedule: dict[str, Any]
    environment: dict[str, Any]
    results: list[BenchResult] = field(default_factory=list)
    regression: RegressionReport | None = None

    @property
    def passed(self) -> bool:
        """False only when a baseline was given and a real regression was found."""
        return self.regression is None or not self.regression.regressed

    def result(self, backend: str, batch_size: int) -> BenchResult:
        for r in self.results:
            if r.key == (backend, batch_size):
                return r
        raise KeyError(f"no result for backend {backend!r} at batch size {batch_size}")

    def to_dict(self, include_samples: bool = False) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "onnx_path": self.onnx_path,
            "model": self.model,
            "schedule": dict(self.schedule),
            "environment": dict(self.environment),
            "results": [r.to_dict(include_samples) for r in self.results],
            "regression": self.regression.to_dict() if self.regression is not None else None,
            "passed": self.passed,
        }
