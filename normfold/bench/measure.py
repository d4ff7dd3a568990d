"""The timing loop: warm-up, then per-iteration latencies from ``time.perf_counter_ns``.

Why it looks like this:

* ``perf_counter_ns`` is monotonic, has the finest resolution Python offers and returns integers, so
  no float rounding creeps into sub-microsecond differences.
* Each iteration is timed on its own (two clock reads around one call) rather than dividing a block
  time by a count: percentiles need the individual latencies, and the two clock reads cost tens of
  nanoseconds, far below what any model takes.
* Warm-up runs before anything is recorded, by count or by seconds, so allocator growth, lazy kernel
  selection and cache warming do not land in the steady state. The first inference is measured
  separately by the caller (see :func:`timed`), never as a steady-state sample.
* The cyclic garbage collector is paused while the loop runs (as :mod:`timeit` does) so a collection
  triggered by unrelated garbage does not appear as model latency; it is restored afterwards.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from normfold.errors import UsageError

T = TypeVar("T")

#: Hard cap on samples in duration mode, so a sub-microsecond call cannot exhaust memory.
MAX_DURATION_SAMPLES = 2_000_000


@dataclass(frozen=True)
class Schedule:
    """How long to warm up and how long to measure.

    Warm-up is ``warmup_s`` seconds when given, else ``warmup`` calls. Measurement is ``duration_s``
    seconds when given (at least ``min_iters`` calls), else exactly ``iters`` calls.
    """

    warmup: int = 10
    warmup_s: float | None = None
    iters: int = 200
    duration_s: float | None = None
    min_iters: int = 1

    def __post_init__(self) -> None:
        if self.warmup < 0:
            raise UsageError(f"--warmup must be >= 0, got {self.warmup}")
        if self.warmup_s is not None and not (math.isfinite(self.warmup_s) and self.warmup_s >= 0):
            raise UsageError(f"--warmup-s must be a finite number of seconds >= 0, got {self.warmup_s}")
        if self.iters < 1:
            raise UsageError(f"--iters must be >= 1, got {self.iters}")
        if self.duration_s is not None and not (math.isfinite(self.duration_s) and self.duration_s > 0):
            raise UsageError(f"--duration must be a finite number of seconds > 0, got {self.duration_s}")
        if self.min_iters < 1:
            raise UsageError(f"min_iters must be >= 1, got {self.min_iters}")

    def describe(self) -> str:
        warm = f"{self.warmup_s:g} s warm-up" if self.warmup_s is not None else f"{self.warmup} warm-up calls"
        meas = f"{self.duration_s:g} s measured" if self.duration_s is not None else f"{self.iters} measured calls"
        return f"{warm}, {meas}"

    def to_dict(self) -> dict[str, float | int | None]:
        return {
            "warmup": None if self.warmup_s is not None else self.warmup,
            "warmup_s": self.warmup_s,
            "iters": None if self.duration_s is not None else self.iters,
            "duration_s": self.duration_s,
        }


@dataclass
class Measurement:
    """Raw result of one timing loop: warm-up count and time, and one latency per measured call."""

    warmup_iterations: int
    warmup_ns: int
    samples_ns: list[int] = field(default_factory=list)


def timed(fn: Callable[[], T]) -> tuple[T, int]:
    """Call ``fn`` once; return its result and the elapsed nanoseconds (first-run latency, load time)."""
    t0 = time.perf_counter_ns()
    result = fn()
    return result, time.perf_counter_ns() - t0


def _warm_up(fn: Callable[[], object], schedule: Schedule) -> tuple[int, int]:
    clock = time.perf_counter_ns
    start = clock()
    count = 0
    if schedule.warmup_s is not None:
        deadline = start + int(schedule.warmup_s * 1e9)
        while clock() < deadline:
            fn()
            count += 1
    else:
        for _ in range(schedule.warmup):
            fn()
        count = schedule.warmup
    return count, clock() - start


def _measure_count(fn: Callable[[], object], iters: int) -> list[int]:
    clock = time.perf_counter_ns
    samples = [0] * iters
    for i in range(iters):
        t0 = clock()
        fn()
        samples[i] = clock() - t0
    return samples


def _measure_duration(fn: Callable[[], object], duration_s: float, min_iters: int) -> list[int]:
    clock = time.perf_counter_ns
    samples: list[int] = []
    append = samples.append
    deadline = clock() + int(duration_s * 1e9)
    while True:
        t0 = clock()
        fn()
        t1 = clock()
        append(t1 - t0)
        if (t1 >= deadline and len(samples) >= min_iters) or len(samples) >= MAX_DURATION_SAMPLES:
            return samples


def measure(fn: Callable[[], object], schedule: Schedule) -> Measurement:
    """Warm ``fn`` up, then time each measured call with ``perf_counter_ns`` (GC paused meanwhile)."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        warm_count, warm_ns = _warm_up(fn, schedule)
        if schedule.duration_s is not None:
            samples = _measure_duration(fn, schedule.duration_s, schedule.min_iters)
        else:
            samples = _measure_count(fn, schedule.iters)
    finally:
        if gc_was_enabled:
            gc.enable()
    return Measurement(warm_count, warm_ns, samples)


# --------------------------------------------------------------------------------------------------------
# Stability windows (perf_analyzer's rule) and interleaved A/B confirmation

#: perf_analyzer's defaults: 3 consecutive windows whose medians lie within 10% of each other.
STABLE_WINDOWS = 3
STABILITY = 0.10


@dataclass
class StableMeasurement:
    """Windows measured until the last ``STABLE_WINDOWS`` medians agreed within ``stability`` (or gave up).

    ``samples_ns`` holds the calls of those last windows only: the steady state, not the approach to it.
    """

    window_p50_ns: list[float]
    samples_ns: list[int]
    stable: bool
    stability: float
    spread: float  # (max - min) / mean of the last windows' medians

    def to_dict(self) -> dict[str, object]:
        return {
            "windows": len(self.window_p50_ns),
            "window_p50_ms": [round(v / 1e6, 6) for v in self.window_p50_ns],
            "stable": self.stable,
            "stability": self.stability,
            "spread": self.spread,
        }


def _median(values: list[float] | list[int]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return float(ordered[n // 2]) if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2.0


def window_spread(p50s: list[float]) -> float:
    """``(max − min) / mean`` of window medians: 0 when they agree exactly."""
    mean = sum(p50s) / len(p50s)
    return (max(p50s) - min(p50s)) / mean if mean > 0 else 0.0


def measure_until_stable(
    fn: Callable[[], object],
    *,
    window_s: float = 0.25,
    stability: float = STABILITY,
    windows: int = STABLE_WINDOWS,
    max_windows: int = 12,
    warmup_s: float = 0.1,
    warmup: int = 0,
    min_iters: int = 5,
) -> StableMeasurement:
    """Measure ``window_s`` windows (of at least ``min_iters`` calls) until ``windows`` consecutive medians
    agree within ``stability``, after ``warmup`` calls and ``warmup_s`` seconds of warm-up.

    Like perf_analyzer's ``--stability-percentage``: a level that is still moving (another process
    starting, a CPU clocking up) is not a measurement. After ``max_windows`` without agreement the
    result says ``stable=False`` instead of guessing.
    """
    if windows < 2 or max_windows < windows:
        raise UsageError(f"need 2 <= windows <= max_windows, got {windows} and {max_windows}")
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        _warm_up(fn, Schedule(warmup=warmup))
        _warm_up(fn, Schedule(warmup_s=warmup_s))
        per_window: list[list[int]] = []
        p50s: list[float] = []
        while len(per_window) < max_windows:
            samples = _measure_duration(fn, window_s, max(1, min_iters))
            per_window.append(samples)
            p50s.append(_median(samples))
            if len(p50s) >= windows and window_spread(p50s[-windows:]) <= stability:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    last = p50s[-windows:]
    spread = window_spread(last)
    samples_ns = [s for w in per_window[-windows:] for s in w]
    return StableMeasurement(p50s, samples_ns, spread <= stability, stability, spread)


@dataclass
class Interleaved:
    """A/B windows alternated (ABBA), so both see the same machine: the per-round ratios of medians."""

    ratios: list[float]

    @property
    def ratio(self) -> float:
        """Median of the per-round ``p50_A / p50_B``."""
        return _median(self.ratios)

    @property
    def low(self) -> float:
        """The lower quartile of the ratios: above 1 means A was slower in most rounds, not only typically."""
        ordered = sorted(self.ratios)
        return ordered[len(ordered) // 4]

    def to_dict(self) -> dict[str, object]:
        return {"rounds": len(self.ratios), "ratio": self.ratio, "low_quartile": self.low}


def interleave(
    a: Callable[[], object], b: Callable[[], object], *, rounds: int = 8, window_s: float = 0.1
) -> Interleaved:
    """Time ``a`` and ``b`` in alternating windows (ABBA order) and return the per-round median ratios.

    Load from other processes comes and goes on a time scale longer than one window, so it hits both
    sides of a round alike and cancels in the ratio, which two separate runs minutes apart cannot do.
    """
    if rounds < 2:
        raise UsageError(f"rounds must be >= 2, got {rounds}")
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        _warm_up(a, Schedule(warmup_s=0.05))
        _warm_up(b, Schedule(warmup_s=0.05))
        ratios = []
        for r in range(rounds):
            order = (a, b) if r % 2 == 0 else (b, a)
            first = _median(_measure_duration(order[0], window_s, 5))
            second = _median(_measure_duration(order[1], window_s, 5))
            pa, pb = (first, second) if r % 2 == 0 else (second, first)
            ratios.append(pa / pb if pb > 0 else float("inf"))
    finally:
        if gc_was_enabled:
            gc.enable()
    return Interleaved(ratios)
