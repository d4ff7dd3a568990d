"""Cost of a per-layer compare against a plain output compare, side by side on the zoo.

For every zoo model: export (and optimize with normfold's passes when they are installed) once, then
alternate ``compare(per_layer=False)`` and ``compare(per_layer=True)`` ``--repeats`` times and print the
medians and their ratio (the budget is ≤ 3×). Both timings include what a user waits for: the eager
run, building the ORT session and the run; the per-layer one adds the hooked eager run, the
instrumented copy of the model, its session and the single run with every layer exposed.

It also prints the numbers behind the per-layer tolerance rule (see normfold.numerics.layers): the
worst ``max_abs / max|ref_layer|`` over the layers of a correct model (noise) against ``rtol``.

    python benchmarks/per_layer_cost.py [--models a,b] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from normfold.exporter import export
from normfold.models import ZOO
from normfold.models.loader import load_model
from normfold.numerics import compare
from normfold.runtime.base import SessionOptions


def _prepare(name: str, root: Path) -> tuple[object, Path, bool]:
    loaded = load_model(f"zoo:{name}")
    raw = root / f"{name}.onnx"
    export(loaded, None, raw)
    try:
        from normfold.fusers import optimize
    except ImportError:
        return loaded, raw, False
    opt = root / f"{name}.opt.onnx"
    optimize(raw, opt)
    return loaded, opt, True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(ZOO), help="comma-separated zoo names (default: all)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions of each variant")
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (same for both)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    options = SessionOptions(intra_op_threads=args.threads)
    header = (
        f"{'model':24s} {'graph':9s} {'plain ms':>9s} {'per-layer ms':>12s} {'ratio':>6s} "
        f"{'layers':>6s} {'matched':>7s} {'fused':>5s} {'unmatched':>9s} {'worst err/max|ref|':>18s}"
    )
    print(header)
    print("-" * len(header))
    ratios = []
    with tempfile.TemporaryDirectory(prefix="normfold-bench-") as tmp:
        for name in names:
            loaded, path, optimized = _prepare(name, Path(tmp))
            # one untimed warm-up of each (imports, first-session costs)
            compare(loaded, path, options=options)
            report = compare(loaded, path, per_layer=True, options=options)
            plain, per_layer = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                compare(loaded, path, options=options)
                t1 = time.perf_counter()
                report = compare(loaded, path, per_layer=True, options=options)
                t2 = time.perf_counter()
                plain.append(t1 - t0)
                per_layer.append(t2 - t1)
            layers = report.backends["ort-cpu"].layers
            noise = max(
                (
                    layer.max_abs / layer.ref_max_abs
                    for layer in layers.layers
                    if layer.max_abs is not None and layer.ref_max_abs
                ),
                default=0.0,
            )
            p, q = statistics.median(plain), statistics.median(per_layer)
            ratios.append(q / p)
            c = layers.counts
            print(
                f"{name:24s} {'optimized' if optimized else 'exported':9s} {p * 1e3:9.1f} {q * 1e3:12.1f} "
                f"{q / p:5.2f}x {c['layers']:6d} {c['matched']:7d} {c['fused']:5d} {c['unmatched']:9d} "
                f"{noise:18.2e}"
                + ("" if layers.first_divergence is None else f"  FIRST DIVERGENCE {layers.first_divergence.name}")
            )
    print("-" * len(header))
    print(
        f"per-layer / plain: median {statistics.median(ratios):.2f}x, max {max(ratios):.2f}x over {len(ratios)} models "
        f"(budget 3x); medians of {args.repeats} alternating runs"
    )
    return 0 if max(ratios) <= 3.0 else 1


if __name__ == "__main__":
    sys.exit(main())
