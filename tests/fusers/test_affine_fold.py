"""Per-channel constant Sub/Div/Mul/Add chains folded into the preceding Conv/Gemm/MatMul."""

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


class ScratchBN(nn.Module):
    """The textbook from-scratch BN: statistics as plain tensors, ``(x - mean) / sqrt(var + eps) * g + b``."""

    def __init__(self, c: int, rank: int, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        shape = (1, c) + (1,) * (rank - 2)
        self.gamma = nn.Parameter(torch.rand(shape, generator=gen) + 0.5)
        self.beta = nn.Parameter(torch.rand(shape, generator=gen) - 0.5)
        self.moving_mean = torch.rand(shape, generator=gen) - 0.5
        self.moving_var = torch.rand(shape, generator=gen) + 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.moving_mean) / torch.sqrt(self.moving_var + 1e-5) * self.gamma + self.beta


class Reversed(nn.Module):
    """``k - y`` then ``* s``: the Sub with the constant on the left flips the sign of the scale."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.k = torch.linspace(-1, 1, c).reshape(c, 1, 1)
        self.s = torch.linspace(0.5, 2, c).reshape(1, c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.k - x) * self.s


def _run(module: nn.Module, x: torch.Tensor, tmp_path: Path) -> tuple[object, dict[str, int], onnx.ModelProto]:
    src, dst = tmp_path / "m.onnx", tmp_path / "o.onnx"
    export_legacy(module.eval(), (x,), src)
    report = optimize(src, dst)
    out = onnx.load(str(dst))
    with torch.no_grad():
        ref = module(x)
    assert_close(run_ort(out, {out.graph.input[0].name: x.numpy()})[0], ref)
    return report, ops(src), out


@pytest.mark.parametrize(
    ("module", "x", "layer"),
    [
        (nn.Sequential(nn.Conv2d(3, 4, 3), ScratchBN(4, 4)), torch.randn(1, 3, 6, 6), "Conv"),
        (nn.Sequential(nn.Conv1d(3, 4, 3, bias=False), ScratchBN(4, 3)), torch.randn(2, 3, 9), "Conv"),
        (
            nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2), ScratchBN(6, 4)),
            torch.randn(1, 4, 5, 5),
            "ConvTranspose",
        ),
        (nn.Sequential(nn.Linear(6, 5), ScratchBN(5, 2)), torch.randn(3, 6), "Gemm"),
        (nn.Sequential(nn.Conv2d(3, 4, 1), Reversed(4)), torch.randn(1, 3, 4, 4), "Conv"),
    ],
    ids=["conv2d", "conv1d-nobias", "convT-groups", "linear", "reversed-sub"],
)
def test_affine_chain_folds_into_layer(module: nn.Module, x: torch.Tensor, layer: str, tmp_path: Path) -> None:
    report, before, out = _run(module, x, tmp_path)
    assert sum(before.get(op, 0) for op in ("Sub", "Div", "Mul", "Add")) >= 2
    assert ops(out) == {layer: 1}
    assert report.rules["fold_affine"].applied == 1
    fused = next(n for n in out.graph.node if n.op_type == layer)
    assert module_path(fused) == "1"  # the hand-written norm module


def test_matmul_chain_becomes_matmul_plus_one_add(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 5)).astype(np.float32)
    k1, k2 = rng.uniform(0.5, 2, 5).astype(np.float32), rng.standard_normal((1, 1, 5)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["m"]),
        helper.make_node("Mul", ["m", "k1"], ["a"]),
        helper.make_node("Add", ["k2", "a"], ["y"]),
    ]
    model = make_model(nodes, [vi("x", [2, 3, 6])], [vi("y", [2, 3, 5])], {"W": w, "k1": k1, "k2": k2})
    report = optimize(model, tmp_path / "o.onnx")
    assert ops(tmp_path / "o.onnx") == {"MatMul": 1, "Add": 1}
    x = rng.standard_normal((2, 3, 6)).astype(np.float32)
    assert_close(run_ort(tmp_path / "o.onnx", {"x": x})[0], (x @ w) * k1 + k2)
    assert report.rules["fold_affine"].applied == 1


def _conv_then(op: str, const_name: str, const: np.ndarray, **graph_inputs: list[int]) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    inits = {"W": rng.standard_normal((4, 3, 1, 1)).astype(np.float32), const_name: const}
    inputs = [vi("x", [1, 3, 4, 4])]
    for name, shape in graph_inputs.items():
        inits.pop(name)
        inputs.append(vi(name, shape))
    ins = ["y", const_name] if op != "RDiv" else [const_name, "y"]
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"]), helper.make_node(op.removeprefix("R"), ins, ["z"])]
    return make_model(nodes, inputs, [vi("z", [1, 4, 4, 4])], inits)


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        (_conv_then("Mul", "k", np.ones((1, 1, 4, 4), np.float32) * 2), "is not per-channel"),
        (_conv_then("Sub", "k", np.ones((4,), np.float32)), "is not per-channel"),  # (C,) is the W axis
        (_conv_then("Sub", "k", np.ones((1, 4, 1, 1), np.float32), k=[1, 4, 1, 1]), "is a graph input"),
        (_conv_then("RDiv", "k", np.ones((1, 4, 1, 1), np.float32)), None),  # k / y is not affine
    ],
    ids=["spatial-constant", "wrong-axis", "graph-input-stats", "reciprocal"],
)
def test_non_affine_or_non_constant_chains_are_left_alone(
    model: onnx.ModelProto, needle: str | None, tmp_path: Path
) -> None:
    report = optimize(model, tmp_path / "o.onnx")
    assert ops(tmp_path / "o.onnx") == ops(model)
    rule = report.rules["fold_affine"]
    assert rule.applied == 0
    if needle is None:
        assert rule.matched == 0
    else:
        assert any(needle in e.reason for e in rule.events)


@pytest.mark.parametrize(
    ("exporter", "opset"), [("torchscript", 17), pytest.param("dynamo", 21, marks=pytest.mark.slow)]
)
def test_lenet_custom_bn_ends_like_folded_lenet_bn(exporter: str, opset: int, tmp_path: Path) -> None:
    """Issue 3, item 4: the hand-written BN folds to the same op histogram as the real one."""
    from normfold.exporter import export
    from normfold.models import ZOO, seeded_inputs

    hist = {}
    for name in ("lenet_bn", "lenet_custom_bn"):
        entry = ZOO[name]
        src = tmp_path / f"{name}.onnx"
        export(entry.build(), seeded_inputs(entry.inputs), src, exporter=exporter, opset=opset)
        report = optimize(src, tmp_path / f"{name}.opt.onnx")
        assert report.verification is not None and report.verification.passed
        hist[name] = report.ops_after
    assert hist["lenet_custom_bn"] == hist["lenet_bn"]
    assert not {"BatchNormalization", "Sub", "Div"} & set(hist["lenet_bn"])
