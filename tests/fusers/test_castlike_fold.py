"""The clean-up folds ``CastLike(constant, x)`` when x's dtype is only known from shape inference (timm ViT)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fold_helpers import make_model, ops, run_ort, vi
from onnx import helper

from normfold.fusers import optimize


def test_castlike_of_a_constant_folds_once_the_dtype_is_inferred(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),  # r has no value_info: its dtype needs inference
        helper.make_node("CastLike", ["scale", "r"], ["s"]),
        helper.make_node("Mul", ["r", "s"], ["y"]),
    ]
    model = make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])], {"scale": np.asarray(0.125, np.float64)}, 21)
    report = optimize(model, tmp_path / "o.onnx", passes=["cleanup"])
    assert ops(tmp_path / "o.onnx") == {"Relu": 1, "Mul": 1}
    assert report.verification is not None and report.verification.passed
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_array_equal(run_ort(tmp_path / "o.onnx", {"x": x})[0], np.maximum(x, 0) * np.float32(0.125))
