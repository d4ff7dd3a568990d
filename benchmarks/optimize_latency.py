"""ORT CPU median latency of every zoo model before vs after ``normfold.optimize``, side by side.

Each model is exported (dynamo at opset 21 by default, or ``--exporter torchscript`` at opset 17), then
optimized with verification. Both sessions use ORT's default graph optimizations (what users run) and
are timed interleaved in rounds, so machine drift hits both alike. ``--level disable`` shows the gain on
a runtime without ORT's own Conv+BN fusion. Run: ``python benchmarks/optimize_latency.py
[--exporter dynamo|torchscript] [--models a,b] [--threads 1] [--level all|basic|disable]``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from normfold.exporter import export
from normfold.fusers import optimize
from normfold.models import ZOO, seeded_inputs

LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}


def _median_ms(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], iters: int) -> float:
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exporter", default="dynamo", choices=("dynamo", "torchscript"))
    parser.add_argument("--models", default=",".join(ZOO))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument(
        "--level", default="all", choices=tuple(LEVELS), help="ORT graph optimization level of both sessions"
    )
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    opset = 21 if args.exporter == "dynamo" else 17
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.log_severity_level = 3
    opts.graph_optimization_level = LEVELS[args.level]
    print(
        f"exporter {args.exporter} opset {opset}, ORT {ort.__version__} CPU, {args.threads} thread(s), "
        f"level {args.level}, "
        f"median of {args.rounds} interleaved rounds x {args.iters} runs"
    )
    header = f"{'model':24} {'nodes':>11} {'before ms':>10} {'after ms':>9} {'speedup':>8}  applied"
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            entry = ZOO[name]
            src, dst = Path(tmp) / f"{name}.onnx", Path(tmp) / f"{name}.opt.onnx"
            inputs = seeded_inputs(entry.inputs)
            export(entry.build(), inputs, src, exporter=args.exporter, opset=opset)
            report = optimize(src, dst)
            sessions = {
                k: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
                for k, p in (("before", src), ("after", dst))
            }
            feeds = {i.name: x.numpy() for i, x in zip(sessions["before"].get_inputs(), inputs, strict=True)}
            for sess in sessions.values():
                _median_ms(sess, feeds, 5)  # warm-up
            res: dict[str, list[float]] = {k: [] for k in sessions}
            for _ in range(args.rounds):
                for k, sess in sessions.items():
                    res[k].append(_median_ms(sess, feeds, args.iters))
            before, after = statistics.median(res["before"]), statistics.median(res["after"])
            nodes = f"{sum(report.ops_before.values())}->{sum(report.ops_after.values())}"
            print(f"{name:24} {nodes:>11} {before:10.3f} {after:9.3f} {before / after:7.2f}x  {report.applied}")


if __name__ == "__main__":
    main()
