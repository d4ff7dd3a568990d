"""``Reshape(Reshape(z, s1), s2)`` → ``Reshape(z, s2)`` when s2 is a constant that copies no input dim."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fold_helpers import make_model, ops, run_ort, vi
from onnx import helper

from normfold.fusers import optimize

RULE = "collapse_reshapes"
X = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)


def _model(s2: list[int], allowzero: int = 0, first_read: bool = False) -> tuple[object, list[int]]:
    nodes = [
        helper.make_node("Reshape", ["x", "s1"], ["a"]),
        helper.make_node("Reshape", ["a", "s2"], ["b"], allowzero=allowzero),
        helper.make_node("Relu", ["b"], ["y"]),
    ]
    outputs = [vi("y", list(X.reshape(6, 4).reshape([d if d else 6 for d in s2]).shape))]
    if first_read:
        nodes.append(helper.make_node("Neg", ["a"], ["n"]))
        outputs.append(vi("n", [6, 4]))
    inits = {"s1": np.asarray([6, 4]), "s2": np.asarray(s2)}
    return make_model(nodes, [vi("x", list(X.shape))], outputs, inits), s2


@pytest.mark.parametrize(
    ("s2", "first_read", "want"),
    [
        ([3, -1, 2], False, {"Reshape": 1, "Relu": 1}),
        ([24], True, {"Reshape": 2, "Relu": 1, "Neg": 1}),  # the first Reshape stays for the Neg
    ],
    ids=["chain", "first-also-read"],
)
def test_two_reshapes_become_one(s2: list[int], first_read: bool, want: dict[str, int], tmp_path: Path) -> None:
    model, _ = _model(s2, first_read=first_read)
    report = optimize(model, tmp_path / "o.onnx", passes=[RULE])  # type: ignore[arg-type]
    assert report.rules[RULE].applied == 1
    assert ops(tmp_path / "o.onnx") == want
    np.testing.assert_array_equal(run_ort(tmp_path / "o.onnx", {"x": X})[0], np.maximum(X.reshape(s2), 0))


def test_a_zero_that_copies_the_intermediate_dim_is_kept(tmp_path: Path) -> None:
    model, _ = _model([0, 2, 2])  # 0 copies the 6 of the intermediate [6, 4], not the 2 of x
    report = optimize(model, tmp_path / "o.onnx", passes=[RULE])  # type: ignore[arg-type]
    assert report.rules[RULE].matched == 0
    assert ops(tmp_path / "o.onnx") == {"Reshape": 2, "Relu": 1}
