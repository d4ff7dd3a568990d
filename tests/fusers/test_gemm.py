"""MatMul + Add → Gemm on ``--target ort-cpu`` (rank 2, and rank > 2 through Reshape), checked on ORT CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from fold_helpers import assert_close, export_legacy, make_model, ops, run_ort, vi
from onnx import helper
from torch import nn

from normfold.exporter.provenance import module_path
from normfold.fusers import optimize
from normfold.fusers.gemm import GROWS

RULE = "matmul_add_to_gemm"
RNG = np.random.default_rng(0)
W = RNG.standard_normal((6, 5)).astype(np.float32)
ROW = RNG.standard_normal(5).astype(np.float32)


class Heads(nn.Module):
    """Q/K/V Linears on one input, each viewed as heads: the transformer shape of the rewrite."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return torch.cat([m(x).view(b, s, 2, 4) for m in (self.q, self.k, self.v)], dim=-1)


def _graph(
    x_shape: list[int | str], w: np.ndarray | None, bias: np.ndarray, view: list[int] | None = None
) -> onnx.ModelProto:
    """``Add(MatMul(x, W), b)`` (then ``Reshape(·, view)``); ``w`` None makes W a graph input."""
    inits = {"b": bias} | ({"W": w} if w is not None else {}) | ({"view": np.asarray(view)} if view else {})
    inputs = [vi("x", x_shape)] + ([vi("W", [6, 5])] if w is None else [])  # type: ignore[list-item]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("Add", ["y", "b"], ["z"])]
    out: list[int | str] = [*x_shape[:-1], 5]
    if view:
        nodes.append(helper.make_node("Reshape", ["z", "view"], ["v"]))
        out = [x_shape[0], *view[1:]]
    return make_model(nodes, inputs, [vi("v" if view else "z", out)], inits)  # type: ignore[arg-type]


def test_heads_become_gemms_sharing_one_reshape_with_provenance(tmp_path: Path) -> None:
    module, x = Heads().eval(), torch.randn(2, 5, 8)
    export_legacy(module, (x,), tmp_path / "m.onnx")
    report = optimize(tmp_path / "m.onnx", tmp_path / "o.onnx", target="ort-cpu", passes=["cleanup", RULE])
    out = onnx.load(str(tmp_path / "o.onnx"))
    with torch.no_grad():
        assert_close(run_ort(out, {out.graph.input[0].name: x.numpy()})[0], module(x))
    assert report.rules[RULE].applied == 3
    counts = ops(out)
    assert counts["Gemm"] == 3 and "MatMul" not in counts
    assert counts["Reshape"] == 4  # one [-1, K] for all three; each view reads its Gemm directly
    assert sorted(module_path(n) for n in out.graph.node if n.op_type == "Gemm") == ["k", "q", "v"]


@pytest.mark.parametrize(
    ("model", "want"),
    [
        (_graph([3, 6], W, ROW), {"Gemm": 1}),
        (_graph([3, 6], W, ROW.reshape(1, 5)), {"Gemm": 1}),
        (_graph(["n", 4, 6], W, ROW.reshape(1, 1, 5), view=[-1, 4, 5, 1]), {"Reshape": 2, "Gemm": 1}),
    ],
    ids=["rank2", "rank2-row-1xN", "rank3-dynamic-batch-then-view"],
)
def test_matmul_add_becomes_gemm(model: onnx.ModelProto, want: dict[str, int], tmp_path: Path) -> None:
    report = optimize(model, tmp_path / "o.onnx", target="ort-cpu", passes=[RULE])
    assert report.rules[RULE].applied == 1
    assert ops(tmp_path / "o.onnx") == want
    x = RNG.standard_normal([3, 4, 6] if len(model.graph.input[0].type.tensor_type.shape.dim) == 3 else [3, 6])
    (got,) = run_ort(tmp_path / "o.onnx", {"x": x.astype(np.float32)})
    np.testing.assert_allclose(got.reshape(*x.shape[:-1], 5), x @ W + ROW, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("model", "target", "reason"),
    [
        (_graph([3, 6], None, ROW), "ort-cpu", "MatMul weight 'W' is a graph input"),
        (_graph([3, 6], W, RNG.standard_normal((3, 5)).astype(np.float32)), "ort-cpu", "not a bias row of length 5"),
        (_graph([2, 3, 6], W, RNG.standard_normal((2, 1, 5)).astype(np.float32)), "ort-cpu", "not a bias row"),
        (_graph(["n", "s", 6], W, ROW), "ort-cpu", "more than one dynamic dim before K"),
        (_graph([2, 3, 6], W, ROW), "ort-cpu", GROWS),
        (_graph([3, 6], W, ROW), "portable", "kept as MatMul + Add on portable"),
    ],
    ids=["weight-input", "matrix-addend", "per-batch-addend", "two-dynamic-dims", "would-grow", "portable"],
)
def test_look_alikes_are_kept_with_the_reason(model: onnx.ModelProto, target: str, reason: str, tmp_path: Path) -> None:
    report = optimize(model, tmp_path / "o.onnx", target=target, passes=[RULE])
    assert ops(tmp_path / "o.onnx") == {"MatMul": 1, "Add": 1}
    summary = report.rules[RULE]
    assert summary.applied == 0
    reasons = [e.reason for e in summary.events]
    assert any(reason in r for r in reasons), reasons
