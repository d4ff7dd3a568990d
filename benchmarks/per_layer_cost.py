"""Cost of a per-layer compare against a plain output compare, side by side on the zoo.

For every zoo model: export (and optimize with normfold's passes when they are installed) once, then
alternate ``compare(per_layer=False)`` and ``compare(per_layer=True)`` ``--repeats`` times and print the
medians and their ratio (the budget is ≤ 3×). Both timings include what a user waits for: the eager
run, building the ORT session and the run; the per-layer one adds the hooked eager run, the
instrumented copy of the model, its session and the single run with every layer exposed. A third
ratio adds resolving the model reference (``load_model``), which the ``normfold compare`` command does
before either: that is the cost a user of the command sees, interpreter start-up aside.

Both wall-clock and process CPU time are printed: on a shared machine the wall clock of runs this short
(milliseconds) is dominated by other processes, CPU time is not. Threads default to one per library
(torch, ORT intra-op, OpenBLAS) so neither variant pays for thread wake-ups the other does not.

It also prints the numbers behind the per-layer tolerance rule (see normfold.numerics.layers): the
worst ``max_abs / max|ref_layer|`` over the layers of a correct model (noise) against ``rtol``.

    python benchmarks/per_layer_cost.py [--models a,b] [--repeats 7] [--threads 1] [--batch 8]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads; see the docstring

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from normfold.exporter import export
from normfold.models import ZOO
from normfold.models.loader import load_model
from normfold.models.registry import InputSpec
from normfold.numerics import compare
from normfold.runtime.base import SessionOptions


def _prepare(name: str, root: Path, batch: int | None) -> tuple[object, Path, bool]:
    specs = None
    if batch:
        specs = [InputSpec(s.name, (batch, *s.shape[1:]), s.dtype) for s in ZOO[name].inputs]
    loaded = load_model(f"zoo:{name}", inputs=specs)
    raw = root / f"{name}.onnx"
    export(loaded, None, raw)
    try:
        from normfold.fusers import optimize
    except ImportError:
        return loaded, raw, False
    opt = root / f"{name}.opt.onnx"
    optimize(raw, opt)
    return loaded, opt, True


def _timed(loaded: object, path: Path, options: SessionOptions, per_layer: bool) -> tuple[float, float]:
    """(wall, cpu) seconds of one ``compare`` call."""
    w, c = time.perf_counter(), time.process_time()
    compare(loaded, path, per_layer=per_layer, options=options)  # type: ignore[arg-type]
    return time.perf_counter() - w, time.process_time() - c


def _load_cpu(name: str, batch: int | None) -> float:
    """CPU seconds of resolving the model reference, which ``normfold compare`` does before comparing."""
    c = time.process_time()
    specs = [InputSpec(s.name, (batch, *s.shape[1:]), s.dtype) for s in ZOO[name].inputs] if batch else None
    load_model(f"zoo:{name}", inputs=specs)
    return time.process_time() - c


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(ZOO), help="comma-separated zoo names (default: all)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repetitions of each variant")
    parser.add_argument("--threads", type=int, default=1, help="torch and ORT intra-op threads (same for both)")
    parser.add_argument("--batch", type=int, default=None, help="override dim 0 of every zoo input (default: zoo's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    options = SessionOptions(intra_op_threads=args.threads)
    print(f"{'':32s}{'compare() ms':>20s}{'compare() ratio':>18s}{'command':>16s}")
    header = (
        f"{'model':22s} {'graph':9s} {'plain wall/cpu':>16s} {'layers wall/cpu':>16s} {'wall':>6s} {'cpu':>6s} "
        f"{'load ms':>7s} {'cpu':>6s} {'layers':>6s} {'match':>5s} {'fused':>5s} {'unmat':>5s} {'err/max|ref|':>12s}"
    )
    print(header)
    print("-" * len(header))
    ratios: dict[str, list[float]] = {"wall": [], "cpu": [], "command": []}
    worst = 0.0
    with tempfile.TemporaryDirectory(prefix="normfold-bench-") as tmp:
        for name in names:
            loaded, path, optimized = _prepare(name, Path(tmp), args.batch)
            compare(loaded, path, options=options)  # untimed warm-up of both variants
            report = compare(loaded, path, per_layer=True, options=options)
            plain, per_layer, load = [], [], []
            for _ in range(args.repeats):  # alternate, so drift hits both alike
                load.append(_load_cpu(name, args.batch))
                plain.append(_timed(loaded, path, options, per_layer=False))
                per_layer.append(_timed(loaded, path, options, per_layer=True))
            layers = report.backends["ort-cpu"].layers
            noise = max(
                (
                    layer.max_abs / layer.ref_max_abs
                    for layer in layers.layers
                    if layer.max_abs is not None and layer.ref_max_abs
                ),
                default=0.0,
            )
            worst = max(worst, noise)
            pw, pc = (statistics.median(t[i] for t in plain) for i in (0, 1))
            lw, lc = (statistics.median(t[i] for t in per_layer) for i in (0, 1))
            ld = statistics.median(load)
            ratios["wall"].append(lw / pw)
            ratios["cpu"].append(lc / pc)
            ratios["command"].append((ld + lc) / (ld + pc))
            c = layers.counts
            flag = "" if layers.first_divergence is None else f"  FIRST DIVERGENCE {layers.first_divergence.name}"
            print(
                f"{name:22s} {'optimized' if optimized else 'exported':9s} {pw * 1e3:7.1f}/{pc * 1e3:7.1f} "
                f"{lw * 1e3:7.1f}/{lc * 1e3:7.1f} {lw / pw:5.2f}x {lc / pc:5.2f}x {ld * 1e3:7.1f} "
                f"{ratios['command'][-1]:5.2f}x {c['layers']:6d} {c['matched']:5d} {c['fused']:5d} "
                f"{c['unmatched']:5d} {noise:12.2e}{flag}"
            )
    print("-" * len(header))
    labels = {
        "wall": "compare(), wall",
        "cpu": "compare(), CPU",
        "command": "load_model + compare() (what `normfold compare` does), CPU",
    }
    for key, label in labels.items():
        r = ratios[key]
        over = [n for n, x in zip(names, r, strict=True) if x > 3.0]
        print(
            f"per-layer / plain, {label}: median {statistics.median(r):.2f}x, max {max(r):.2f}x "
            f"(over 3x: {', '.join(over) or 'none'})"
        )
    print(f"worst layer error of a correct model: {worst:.2e}·max|ref_layer| (tolerance: rtol·max|ref_layer| = 1e-4·)")
    batch = f"batch {args.batch}" if args.batch else "the zoo's input shapes"
    print(f"medians of {args.repeats} alternating runs, {args.threads} thread(s) per library, {batch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
