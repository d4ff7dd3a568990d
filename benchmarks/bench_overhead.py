"""Does ``normfold bench`` measure the model, or itself? And does it give the same answer twice?

1. **Harness overhead.** ``normfold.bench.benchmark()`` and a bare ``session.run`` loop time the same
   ONNX model in the same process, in rounds ordered ABBA / BAAB (normfold, bare, bare, normfold, then
   the reverse) so CPU-frequency and background drift hit both equally. Each round creates a fresh session
   on both sides with the same thread count and graph optimization level. The figure of merit is the
   ratio of the medians of the per-round p50s; the issue requires it to be within 3% of 1.
2. **Stability.** The same ``normfold bench`` command (``--warmup-s 0.5 --duration 3`` by default, so
   each run averages over a few seconds of whatever else the machine is doing) is run twice as separate
   processes, as a user or CI would; the p50s must agree within 10%. A third, in-process run is then
   checked against the first as a baseline and must not be called a regression.

Run from the repository root::

    python benchmarks/bench_overhead.py [--model zoo:resnet_basic] [--rounds 40] [--iters 200]

It prints the figures and exits 1 when a requirement is missed. Timings live here, never in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from normfold.bench import benchmark
from normfold.bench.regression import check_regression


def export_model(ref: str, out_dir: Path) -> Path:
    from normfold.exporter import export
    from normfold.models.loader import load_model

    path = out_dir / "model.onnx"
    export(load_model(ref), None, path, dynamic_batch=True)
    return path


def bare_samples(onnx_path: Path, feeds: dict[str, np.ndarray], threads: int, warmup: int, iters: int) -> list[float]:
    """The plainest possible loop: one ``perf_counter_ns`` pair around each ``session.run``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), sess_options=so, providers=["CPUExecutionProvider"])
    for _ in range(warmup):
        sess.run(None, feeds)
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter_ns()
        sess.run(None, feeds)
        samples.append(time.perf_counter_ns() - t0)
    return [s / 1e6 for s in samples]


def normfold_samples(onnx_path: Path, batch: int, threads: int, warmup: int, iters: int) -> list[float]:
    report = benchmark(onnx_path, batch_sizes=[batch], warmup=warmup, iters=iters, threads=threads)
    return report.results[0].samples_ms


def overhead(onnx_path: Path, batch: int, threads: int, rounds: int, warmup: int, iters: int) -> dict[str, float]:
    from normfold.bench.harness import batch_shapes, onnx_input_metas
    from normfold.runtime.run import random_feeds

    metas = onnx_input_metas(onnx_path)
    feeds = random_feeds(metas, batch_shapes(metas, batch, {}), seed=0)  # the same feeds normfold builds
    ours: list[float] = []
    bare: list[float] = []

    def run_ours() -> list[float]:
        return normfold_samples(onnx_path, batch, threads, warmup, iters)

    def run_bare() -> list[float]:
        return bare_samples(onnx_path, feeds, threads, warmup, iters)

    pooled: dict[str, list[float]] = {"ours": [], "bare": []}
    paired: list[float] = []
    for r in range(rounds):
        # ABBA in even rounds, BAAB in odd ones: cancels linear drift within a round and order effects
        order = (run_ours, run_bare, run_bare, run_ours) if r % 2 == 0 else (run_bare, run_ours, run_ours, run_bare)
        got: dict[str, list[float]] = {"ours": [], "bare": []}
        for fn in order:
            side = "ours" if fn is run_ours else "bare"
            samples = fn()
            got[side].append(statistics.median(samples))
            pooled[side].extend(samples)
        ours.extend(got["ours"])
        bare.extend(got["bare"])
        paired.append(statistics.fmean(got["ours"]) / statistics.fmean(got["bare"]))
    return {
        "pooled_normfold_p50_ms": statistics.median(pooled["ours"]),
        "pooled_bare_p50_ms": statistics.median(pooled["bare"]),
        "pooled_ratio": statistics.median(pooled["ours"]) / statistics.median(pooled["bare"]),
        "normfold_p50_ms": statistics.median(ours),
        "bare_p50_ms": statistics.median(bare),
        "ratio": statistics.median(ours) / statistics.median(bare),
        "paired_ratio_median": statistics.median(paired),
        "paired_ratio_min": min(paired),
        "paired_ratio_max": max(paired),
    }


def cli_run(onnx_path: Path, out: Path, batches: str, threads: int, duration_s: float) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "normfold",
        "bench",
        str(onnx_path),
        "--batch",
        batches,
        "--threads",
        str(threads),
        "--warmup-s",
        "0.5",
        "--duration",
        str(duration_s),
        "--json",
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="zoo:resnet_basic")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--stability-batches", default="1,8")
    ap.add_argument(
        "--stability-duration", type=float, default=3.0, help="seconds measured per batch size in each stability run"
    )
    ap.add_argument("--skip-stability", action="store_true")
    args = ap.parse_args()

    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_model(args.model, Path(tmp))
        print(f"model {args.model} exported with dynamic batch; threads={args.threads}, batch={args.batch}")
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")

        o = overhead(onnx_path, args.batch, args.threads, args.rounds, args.warmup, args.iters)
        print(
            f"[overhead] {args.rounds} ABBA/BAAB rounds × 2 runs each side × {args.iters} iters: "
            f"normfold p50 {o['normfold_p50_ms']:.4f} ms, bare session.run p50 {o['bare_p50_ms']:.4f} ms, "
            f"ratio {o['ratio']:.4f} (per-round ratios: median {o['paired_ratio_median']:.4f}, "
            f"range {o['paired_ratio_min']:.4f}..{o['paired_ratio_max']:.4f})"
        )
        print(
            f"[overhead] all samples pooled per side: normfold p50 {o['pooled_normfold_p50_ms']:.4f} ms, "
            f"bare p50 {o['pooled_bare_p50_ms']:.4f} ms, ratio {o['pooled_ratio']:.4f}"
        )
        # The verdict uses the paired per-round ratio: each ABBA/BAAB round compares both sides under the
        # same machine load, so load that changes between rounds (a shared machine) cancels out. The
        # unpaired medians above mix rounds of different load and are printed for reference only.
        ratio = o["paired_ratio_median"]
        ok = abs(ratio - 1.0) <= 0.03
        failed |= not ok
        print(f"[overhead] {'PASS' if ok else 'FAIL'}: paired |ratio − 1| = {abs(ratio - 1):.2%} (limit 3%)")
        if args.skip_stability:
            return 1 if failed else 0

        a = cli_run(onnx_path, Path(tmp) / "a.json", args.stability_batches, args.threads, args.stability_duration)
        b = cli_run(onnx_path, Path(tmp) / "b.json", args.stability_batches, args.threads, args.stability_duration)
        rows_a = {(r["backend"], r["batch_size"]): r for r in a["results"]}
        worst = 0.0
        for row in b["results"]:
            key = (row["backend"], row["batch_size"])
            pa, pb = rows_a[key]["p50_ms"], row["p50_ms"]
            spread = abs(pb - pa) / min(pa, pb)
            worst = max(worst, spread)
            print(
                f"[stability] {key[0]} batch {key[1]}: "
                f"run 1 p50 {pa:.4f} ms, run 2 p50 {pb:.4f} ms, spread {spread:.2%}"
            )
        ok = worst <= 0.10
        failed |= not ok
        print(f"[stability] {'PASS' if ok else 'FAIL'}: worst p50 spread between two CLI runs {worst:.2%} (limit 10%)")

        in_process = benchmark(
            onnx_path,
            batch_sizes=[int(x) for x in args.stability_batches.split(",")],
            warmup_s=0.5,
            duration_s=args.stability_duration,
            threads=args.threads,
        )
        reg = check_regression(in_process, a, "10%")
        statuses = ", ".join(f"{e.backend}/b{e.batch_size}: {e.status} ({e.change:+.1%})" for e in reg.entries)
        print(f"[stability] third run (in-process) vs run 1 as baseline: {statuses}")
        failed |= reg.regressed
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
