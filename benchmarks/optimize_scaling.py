"""How ``normfold.optimize`` time grows with model size: generated deep Conv→BN→ReLU stacks, 1k→10k nodes.

Each block is ``Conv(1x1) → BatchNormalization → Relu`` on a tiny tensor, so the time measured is the
passes' own graph work, not tensor math. Prints wall and CPU time of ``optimize(verify=False)`` (CPU time
is the robust figure on a shared machine), CPU ms per 1000 nodes, the wall time with verification (one
ORT session for the input and one for the result on top), and the slowest passes.
Run: ``python benchmarks/optimize_scaling.py [--sizes 1000,2000,5000,10000] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from normfold.fusers import optimize


def deep_model(n_nodes: int, channels: int = 4) -> onnx.ModelProto:
    """``n_nodes // 3`` Conv→BN→Relu blocks (so about ``n_nodes`` nodes before optimization)."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    prev = "x"
    for i in range(max(1, n_nodes // 3)):
        w = rng.standard_normal((channels, channels, 1, 1)).astype(np.float32) * 0.5
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        inits.append(numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32) * 0.1, f"b{i}"))
        for name, arr in (
            ("g", rng.uniform(0.5, 1.5, channels)),
            ("be", rng.uniform(-0.1, 0.1, channels)),
            ("m", rng.uniform(-0.1, 0.1, channels)),
            ("v", rng.uniform(0.5, 1.5, channels)),
        ):
            inits.append(numpy_helper.from_array(arr.astype(np.float32), f"{name}{i}"))
        nodes.append(helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], name=f"/l{i}/conv/Conv"))
        nodes.append(
            helper.make_node(
                "BatchNormalization", [f"c{i}", f"g{i}", f"be{i}", f"m{i}", f"v{i}"], [f"n{i}"], name=f"/l{i}/bn/BN"
            )
        )
        nodes.append(helper.make_node("Relu", [f"n{i}"], [f"r{i}"], name=f"/l{i}/Relu"))
        prev = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "deep",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 4, 4])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, channels, 4, 4])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,2000,5000,10000")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    sizes = [int(s) for s in args.sizes.split(",")]
    optimize(deep_model(300), verify=False)  # warm imports (onnxscript's optimizer, ORT)
    header = (
        f"{'nodes':>7} {'wall s':>8} {'cpu s':>7} {'cpu ms/1k':>10} {'verified s':>11} {'ms/1k':>7}  top passes (wall)"
    )
    print(header)
    print("-" * len(header))
    for n in sizes:
        model = deep_model(n)
        nodes = len(model.graph.node)
        plain, cpu, verified, per_pass = [], [], [], []
        for _ in range(args.repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            report = optimize(model, verify=False)
            plain.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            per_pass.append(report.pass_seconds)
            t0 = time.perf_counter()
            checked = optimize(model, verify=True)
            verified.append(time.perf_counter() - t0)
            assert checked.verification is not None and checked.verification.passed
            assert checked.ops_after == {"Conv": nodes // 3, "Relu": nodes // 3}
        p, c, v = statistics.median(plain), statistics.median(cpu), statistics.median(verified)
        passes = {k: statistics.median(d[k] for d in per_pass) for k in per_pass[0]}
        top = ", ".join(f"{k} {t * 1e3:.0f}ms" for k, t in sorted(passes.items(), key=lambda kv: -kv[1])[:3])
        print(f"{nodes:7d} {p:8.2f} {c:7.2f} {c / nodes * 1e6:10.0f} {v:11.2f} {v / nodes * 1e6:7.0f}  {top}")


if __name__ == "__main__":
    main()
