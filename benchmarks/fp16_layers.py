"""Should layers decide at fp16/bf16? Per-layer error ÷ tolerance of *correct* low-precision conversions.

    python benchmarks/fp16_layers.py                   # every zoo model, fp16 and bf16, ORT CPU
    python benchmarks/fp16_layers.py --models resnet_basic --precisions fp16

Each zoo model is exported, optimized and converted with ``normfold convert`` (fp32 norm islands, fp32
I/O), then compared at that precision's tolerance with the per-layer diff. Printed per model: whether the
outputs pass, the worst layer error ÷ its tolerance (≥ 1 means "layers" would fail a correct model),
and the share of layers over tolerance. ORT's CPU EP widens some fp16 kernels internally, so these are
lower bounds of what a GPU shows.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from normfold.exporter import export
from normfold.fusers import optimize
from normfold.fusers.precision import convert_precision
from normfold.models import ZOO
from normfold.models.loader import load_model
from normfold.numerics import compare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(sorted(ZOO)))
    parser.add_argument("--precisions", default="fp16,bf16")
    args = parser.parse_args()
    worst_by_precision: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="fp16-layers-") as tmp_dir:
        tmp = Path(tmp_dir)
        for name in args.models.split(","):
            loaded = load_model(f"zoo:{name}")
            raw = export(loaded, None, tmp / f"{name}.onnx").path
            optimize(raw, tmp / f"{name}.opt.onnx")
            for precision in args.precisions.split(","):
                low = tmp / f"{name}.{precision}.onnx"
                try:
                    convert_precision(tmp / f"{name}.opt.onnx", low, precision=precision, keep_io_types=True)
                    report = compare(loaded, low, precision=precision, per_layer=True, fail_on="outputs")
                except Exception as e:  # e.g. an op without a bf16 kernel on ORT CPU
                    print(f"{name:24s} {precision}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
                    continue
                b = report.backends["ort-cpu"]
                rows = [r for r in b.layers.layers if r.metrics is not None and r.tolerance is not None]
                ratios = [r.metrics.max_abs / r.tolerance.atol for r in rows]
                worst = max(ratios, default=0.0)
                over = sum(x > 1 for x in ratios)
                worst_by_precision.setdefault(precision, []).append(worst)
                outputs = "pass" if all(m.passed for m in b.outputs.values()) else "FAIL"
                print(
                    f"{name:24s} {precision}: outputs {outputs}, worst layer err/tol {worst:.3f}, "
                    f"{over}/{len(rows)} layers over tolerance",
                    flush=True,
                )
    for precision, values in worst_by_precision.items():
        median = sorted(values)[len(values) // 2]
        print(f"{precision}: worst layer err/tol over the zoo {max(values):.3f} (median {median:.3f})")


if __name__ == "__main__":
    main()
