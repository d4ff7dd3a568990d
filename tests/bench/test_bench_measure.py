"""The timing loop's structure: call counts, warm-up modes, duration mode, clock bounds, GC restore."""

from __future__ import annotations

import gc
import time

import pytest

from normfold.bench.measure import Schedule, measure, timed
from normfold.errors import UsageError


class Counter:
    def __init__(self, sleep_s: float = 0.0) -> None:
        self.calls = 0
        self.sleep_s = sleep_s

    def __call__(self) -> int:
        self.calls += 1
        if self.sleep_s:
            time.sleep(self.sleep_s)
        return self.calls


def test_count_mode_calls_warmup_plus_iters() -> None:
    fn = Counter()
    m = measure(fn, Schedule(warmup=7, iters=13))
    assert fn.calls == 20
    assert m.warmup_iterations == 7
    assert len(m.samples_ns) == 13
    assert all(isinstance(s, int) and s >= 0 for s in m.samples_ns)


def test_samples_bound_the_call_from_below() -> None:
    m = measure(Counter(sleep_s=0.002), Schedule(warmup=0, iters=3))
    assert min(m.samples_ns) >= 2_000_000


def test_warmup_by_seconds_runs_until_the_deadline() -> None:
    fn = Counter(sleep_s=0.001)
    m = measure(fn, Schedule(warmup=999, warmup_s=0.02, iters=2))
    assert m.warmup_ns >= 20_000_000
    assert 1 <= m.warmup_iterations < 999  # seconds win over the count
    assert fn.calls == m.warmup_iterations + 2


def test_duration_mode_measures_for_the_duration() -> None:
    fn = Counter(sleep_s=0.001)
    t0 = time.perf_counter_ns()
    m = measure(fn, Schedule(warmup=0, iters=10_000, duration_s=0.03))
    elapsed = time.perf_counter_ns() - t0
    assert elapsed >= 30_000_000
    assert 1 <= len(m.samples_ns) < 10_000
    assert sum(m.samples_ns) <= elapsed


def test_duration_mode_honours_min_iters() -> None:
    m = measure(Counter(sleep_s=0.002), Schedule(warmup=0, duration_s=1e-6, min_iters=4))
    assert len(m.samples_ns) == 4


def test_gc_is_restored_even_when_the_call_raises() -> None:
    assert gc.isenabled()

    def boom() -> None:
        assert not gc.isenabled()  # paused inside the loop
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        measure(boom, Schedule(warmup=1, iters=1))
    assert gc.isenabled()


def test_timed_returns_result_and_elapsed() -> None:
    result, ns = timed(lambda: time.sleep(0.001) or 42)
    assert result == 42 and ns >= 1_000_000


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"warmup": -1}, "--warmup"),
        ({"warmup_s": -0.5}, "--warmup-s"),
        ({"warmup_s": float("nan")}, "--warmup-s"),
        ({"iters": 0}, "--iters"),
        ({"duration_s": 0.0}, "--duration"),
        ({"duration_s": float("inf")}, "--duration"),
    ],
)
def test_schedule_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        Schedule(**kwargs)


def test_schedule_describes_what_wins() -> None:
    s = Schedule(warmup=5, warmup_s=1.5, iters=100, duration_s=2.0)
    assert s.describe() == "1.5 s warm-up, 2 s measured"
    assert s.to_dict() == {"warmup": None, "warmup_s": 1.5, "iters": None, "duration_s": 2.0}
    assert Schedule().to_dict() == {"warmup": 10, "warmup_s": None, "iters": 200, "duration_s": None}
