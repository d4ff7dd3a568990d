"""Inject a real slowdown into an ONNX model without changing its outputs (for gate_flakes.py and tests).

A side branch recomputes the input ``k`` times through a MatMul and adds ``0 · ReduceSum(branch)`` to
the first output: the outputs are bit-identical (x + 0·finite = x), the extra work is real, and ORT
does not remove it (a Mul by a constant zero of a non-constant tensor is not folded).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper


def add_side_branch(src: Path, dst: Path, size: int, repeats: int = 1) -> Path:
    """``dst`` = ``src`` plus ``repeats`` chained ``size``×``size`` MatMuls whose result is multiplied by 0."""
    model = onnx.load(str(src))
    g = model.graph
    out = g.output[0].name
    w = numpy_helper.from_array(np.full((size, size), 1.0 / size, np.float32), "slow_w")
    x0 = numpy_helper.from_array(np.ones((1, size), np.float32), "slow_x0")
    zero = numpy_helper.from_array(np.zeros((), np.float32), "slow_zero")
    g.initializer.extend([w, x0, zero])
    # Feed the branch from the model's first input so it cannot be constant-folded away.
    first = g.input[0].name
    nodes = [
        helper.make_node("ReduceMean", [first], ["slow_m"], keepdims=0),
        helper.make_node("Add", ["slow_x0", "slow_m"], ["slow_v0"]),
    ]
    prev = "slow_v0"
    for i in range(repeats):
        nodes.append(helper.make_node("MatMul", [prev, "slow_w"], [f"slow_v{i + 1}"]))
        prev = f"slow_v{i + 1}"
    nodes += [
        helper.make_node("ReduceSum", [prev], ["slow_s"], keepdims=0),
        helper.make_node("Mul", ["slow_s", "slow_zero"], ["slow_z"]),
        helper.make_node("Add", [out, "slow_z"], ["slow_out"]),
    ]
    g.node.extend(nodes)
    g.output[0].name = "slow_out"
    onnx.save(model, str(dst))
    return dst
