"""``x + 0``, ``x − 0``, ``x · 1``, ``x / 1`` removed when the constant keeps x's shape (BERT's empty mask)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from fold_helpers import make_model, ops, run_ort, vi
from onnx import helper

from normfold.fusers import optimize

RULE = "drop_neutral_ops"
X = np.random.default_rng(0).standard_normal((1, 2, 4, 4)).astype(np.float32)


def _model(op: str, k: np.ndarray, k_first: bool = False) -> onnx.ModelProto:
    """``Relu(op(x, k))`` (or ``op(k, x)``): the Relu keeps the neutral node off the graph output."""
    args = ["k", "x"] if k_first else ["x", "k"]
    nodes = [helper.make_node(op, args, ["y"]), helper.make_node("Relu", ["y"], ["z"])]
    shape = list(np.broadcast_shapes(X.shape, k.shape))
    return make_model(nodes, [vi("x", list(X.shape))], [vi("z", shape)], {"k": k})


@pytest.mark.parametrize(
    ("op", "k", "k_first"),
    [
        ("Add", np.zeros((1, 1, 4, 4), np.float32), False),  # HF BERT's additive mask without a mask input
        ("Add", np.zeros((4,), np.float32), True),
        ("Sub", np.zeros((), np.float32), False),
        ("Mul", np.ones((1, 2, 1, 1), np.float32), True),
        ("Div", np.ones((1,), np.float32), False),
    ],
    ids=["add-mask", "add-left", "sub", "mul-left", "div"],
)
def test_neutral_op_is_removed(op: str, k: np.ndarray, k_first: bool, tmp_path: Path) -> None:
    report = optimize(_model(op, k, k_first), tmp_path / "o.onnx", passes=[RULE])
    assert report.rules[RULE].applied == 1
    assert ops(tmp_path / "o.onnx") == {"Relu": 1}
    np.testing.assert_array_equal(run_ort(tmp_path / "o.onnx", {"x": X})[0], np.maximum(X, 0))


@pytest.mark.parametrize(
    ("op", "k", "k_first", "reason"),
    [
        ("Add", np.zeros((3, 1, 1, 1, 1), np.float32), False, "broadcasts x of shape [1, 2, 4, 4] up"),
        ("Add", np.zeros((1, 1, 4, 4), np.float32) + 1e-7, False, None),  # not zero: not a candidate
        ("Sub", np.zeros((1,), np.float32), True, None),  # 0 − x is a negation
        ("Div", np.ones((1,), np.float32), True, None),  # 1 / x is a reciprocal
    ],
    ids=["broadcasts-up", "nearly-zero", "zero-minus-x", "one-over-x"],
)
def test_look_alikes_are_kept(op: str, k: np.ndarray, k_first: bool, reason: str | None, tmp_path: Path) -> None:
    report = optimize(_model(op, k, k_first), tmp_path / "o.onnx", passes=[RULE])
    assert ops(tmp_path / "o.onnx") == {op: 1, "Relu": 1}
    events = report.rules[RULE].events
    assert [e.status for e in events] == (["skipped"] if reason else [])
    assert reason is None or reason in events[0].reason
