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
