"""Standalone BatchNormalization vs the equivalent Mul+Add on ORT CPU, side by side in one run.

Decides what ``normfold.fusers.batchnorm.StandaloneBatchNorm`` emits for a BN with no foldable
neighbour. Run: ``python benchmarks/standalone_bn.py``.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SHAPES = [(1, 64, 56, 56), (8, 64, 56, 56), (1, 256, 14, 14), (32, 512), (4, 128, 1024)]


def _model(shape: tuple[int, ...], form: str) -> bytes:
    rng = np.random.default_rng(0)
    c = shape[1]
    gamma, beta, mean = (rng.standard_normal(c).astype(np.float32) for _ in range(3))
    var = rng.uniform(0.5, 2.0, c).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))
    if form == "bn":
        inits = [numpy_helper.from_array(a, n) for a, n in zip((gamma, beta, mean, var), "gbmv", strict=True)]
        nodes = [helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"], epsilon=1e-5)]
    else:
        s = gamma / np.sqrt(var + 1e-5)
        t = beta - mean * s
        bshape = [c] + [1] * (len(shape) - 2)
        inits = [numpy_helper.from_array(s.reshape(bshape), "s"), numpy_helper.from_array(t.reshape(bshape), "t")]
        nodes = [helper.make_node("Mul", ["x", "s"], ["xs"]), helper.make_node("Add", ["xs", "t"], ["y"])]
    graph = helper.make_graph(nodes, form, [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    return model.SerializeToString()


def _median_ms(sess: ort.InferenceSession, feed: dict[str, np.ndarray], iters: int) -> float:
    for _ in range(10):
        sess.run(None, feed)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    print(f"{'shape':>20} {'BN ms':>9} {'Mul+Add ms':>11} {'Mul+Add/BN':>11}")
    for shape in SHAPES:
        feed = {"x": np.random.default_rng(1).standard_normal(shape).astype(np.float32)}
        sessions = {
            form: ort.InferenceSession(_model(shape, form), opts, providers=["CPUExecutionProvider"])
            for form in ("bn", "muladd")
        }
        res = {form: [] for form in sessions}
        for _ in range(5):  # interleave so drift hits both forms alike
            for form, sess in sessions.items():
                res[form].append(_median_ms(sess, feed, 40))
        bn, ma = statistics.median(res["bn"]), statistics.median(res["muladd"])
        print(f"{'x'.join(map(str, shape)):>20} {bn:9.3f} {ma:11.3f} {ma / bn:11.2f}")


if __name__ == "__main__":
    main()
