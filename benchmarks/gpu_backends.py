"""Side-by-side latency and accuracy of the ONNX backends at fp32 and fp16, in one run.

    python benchmarks/gpu_backends.py [zoo:NAME ...] [--iters 50] [--cache-dir DIR]

For every model and (backend, precision): load time (includes the TensorRT engine build unless it was
cached), the first inference on its own (the TensorRT EP may build there), the median of ``--iters``
further inferences (host↔device copies included, see ``Runner.copies_included``), the ratio to the
ort-cpu fp32 median, and max-abs / cosine against PyTorch eager. Backends that cannot run here print
"skipped (reason)". Ratios only mean something within one run on one machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from normfold.exporter import export
from normfold.fusers.precision import model_for_precision
from normfold.models.loader import load_model
from normfold.runtime import get_backend
from normfold.runtime.base import SessionOptions

COMBOS = [
    ("ort-cpu", "fp32"),
    ("ort-cuda", "fp32"),
    ("ort-cuda", "fp16"),
    ("ort-trt", "fp32"),
    ("ort-trt", "fp16"),
    ("trt", "fp32"),
    ("trt", "fp16"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("refs", nargs="*", default=["zoo:resnet_basic", "zoo:transformer_block", "zoo:unet_resblock"])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="normfold-bench-"))
    cache = args.cache_dir or work / "cache"
    header = (
        f"{'model':22s} {'backend':9s} {'prec':5s} {'load s':>8s} {'first ms':>9s} {'median ms':>10s} "
        f"{'vs cpu':>7s} {'max abs':>9s} {'cosine':>9s}"
    )
    print(header)
    for ref in args.refs:
        loaded = load_model(ref)
        path = export(loaded, None, work / f"{ref.split(':')[-1]}.onnx", opset=21).path
        feeds = {n: t.numpy() for n, t in zip(loaded.input_names, loaded.example_inputs, strict=True)}
        with torch.inference_mode():
            ref_out = loaded.module(*loaded.example_inputs)
        want = (ref_out[0] if isinstance(ref_out, (tuple, list)) else ref_out).numpy().astype(np.float64)
        baseline = None
        for name, precision in COMBOS:
            backend = get_backend(name)
            status = backend.status()
            if not status.available or precision not in status.precisions:
                why = status.reason or f"no {precision}"
                print(f"{ref:22s} {name:9s} {precision:5s} skipped ({why})")
                continue
            opts = SessionOptions(precision=precision, cache_dir=cache, batch_sizes=(1,), convert=model_for_precision)
            t0 = time.perf_counter()
            with backend.load(path, opts) as runner:
                load_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                got = runner.infer(feeds)[runner.output_names[0]]
                first_ms = (time.perf_counter() - t0) * 1e3
                times = []
                for _ in range(args.iters):
                    t0 = time.perf_counter()
                    runner.infer(feeds)
                    times.append((time.perf_counter() - t0) * 1e3)
            median = statistics.median(times)
            baseline = baseline if baseline is not None else median
            a = np.asarray(got, np.float64).ravel()
            cos = float(a @ want.ravel() / (np.linalg.norm(a) * np.linalg.norm(want) + 1e-30))
            print(
                f"{ref:22s} {name:9s} {precision:5s} {load_s:8.2f} {first_ms:9.2f} {median:10.3f} "
                f"{baseline / median:6.2f}x {np.abs(a - want.ravel()).max():9.2e} {cos:9.6f}"
            )


if __name__ == "__main__":
    main()
