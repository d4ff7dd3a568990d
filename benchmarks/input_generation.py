"""Random inputs drawn in the model's dtype vs drawn in float64 and cast (what ``random_feeds`` used to do).

For a float32 input the old path allocated 8 bytes per element, then 4 more for the cast: a peak of 3×
the input. ``normfold.runtime.run.random_feeds`` now draws float32 directly. This prints, side by side,
the median time and the peak traced memory of both over ``--rounds`` rounds (ABBA order, so drift hits
both equally), and the ratio.

Run from the repository root::

    python benchmarks/input_generation.py [--shape 16x3x512x512] [--rounds 6]
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc
from collections.abc import Callable

import numpy as np

from normfold.runtime.base import TensorMeta
from normfold.runtime.run import random_feeds


def _old(shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def _new(shape: tuple[int, ...]) -> np.ndarray:
    return random_feeds([TensorMeta("x", shape, np.dtype(np.float32))], seed=0)["x"]


def _measure(fn: Callable[[tuple[int, ...]], np.ndarray], shape: tuple[int, ...]) -> tuple[float, int]:
    tracemalloc.start()
    start = time.perf_counter()
    fn(shape)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="16x3x512x512")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    shape = tuple(int(d) for d in args.shape.split("x"))
    runs: dict[str, list[tuple[float, int]]] = {"float64 then cast": [], "model dtype": []}
    for r in range(args.rounds):
        order = [("float64 then cast", _old), ("model dtype", _new)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            runs[name].append(_measure(fn, shape))
    print(f"shape {args.shape} float32 ({np.prod(shape) * 4 / 2**20:.0f} MiB), {args.rounds} rounds")
    medians = {}
    for name, values in runs.items():
        ms = statistics.median(v[0] for v in values) * 1e3
        peak = statistics.median(v[1] for v in values) / 2**20
        medians[name] = (ms, peak)
        print(f"  {name:<18} median {ms:8.1f} ms   peak {peak:8.1f} MiB")
    (old_ms, old_peak), (new_ms, new_peak) = medians["float64 then cast"], medians["model dtype"]
    print(f"  ratio new/old: time {new_ms / old_ms:.2f}×, peak memory {new_peak / old_peak:.2f}×")


if __name__ == "__main__":
    main()
