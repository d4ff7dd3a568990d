"""BatchNorm folding rules: positive cases (op counts + ORT vs eager), negative cases (graph unchanged)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from fold_helpers import (
    assert_close,
    bn_arrays,
    bn_numpy,
    export_dynamo,
    export_legacy,
    make_model,
    ops,
    randomize_bn,
    run_ort,
    vi,
)
from onnx import TensorProto, helper
from torch import nn

from normfold.exporter.provenance import module_path
from normfold.fusers import OptimizeReport, PassContext, RulePass, optimize
from normfold.fusers.batchnorm import FuseBatchNormIntoConv

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _feeds(path: Path, args: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args, strict=True)}


def _roundtrip(
    module: nn.Module, args: tuple[torch.Tensor, ...], tmp_path: Path, exporter: str = "legacy", **kw: object
) -> tuple[OptimizeReport, dict[str, int], dict[str, int]]:
    """Export, optimize (verified), then check the optimized model against torch eager."""
    src, dst = tmp_path / "m.onnx", tmp_path / "m.opt.onnx"
    (export_legacy if exporter == "legacy" else export_dynamo)(module.eval(), args, src)
    report = optimize(src, dst, **kw)
    with torch.no_grad():
        ref = module(*args)
    assert_close(run_ort(dst, _feeds(dst, args))[0], ref)
    return report, ops(src), ops(dst)


def _rule(report: OptimizeReport, name: str) -> tuple[int, int, list[str]]:
    r = report.rules[name]
    return r.applied, r.skipped, [e.reason for e in r.events if e.status == "skipped"]


# ---------------------------------------------------------------- BN into the preceding layer


@pytest.mark.parametrize(
    ("dim", "groups", "dilation", "bias"),
    [
        (1, 1, 1, True),
        (1, 2, 2, False),
        (2, 1, 1, False),
        (2, 2, 2, True),
        (2, "dw", 1, False),
        (3, 1, 1, True),
        (3, 2, 1, False),
    ],
)
def test_bn_into_conv(dim: int, groups: int | str, dilation: int, bias: bool, tmp_path: Path) -> None:
    g = 4 if groups == "dw" else groups
    cout = 8 if groups != "dw" else 4
    model = nn.Sequential(CONV[dim](4, cout, 3, groups=g, dilation=dilation, bias=bias), randomize_bn(BN[dim](cout)))
    x = torch.randn(2, 4, *([7] * dim))
    report, before, after = _roundtrip(model, (x,), tmp_path)
    assert before == {"Conv": 1, "BatchNormalization": 1}
    assert after == {"Conv": 1}
    assert _rule(report, "fuse_bn_into_conv")[0] == 1


@pytest.mark.parametrize(
    ("dim", "groups", "bias"), [(1, 1, False), (2, 1, True), (2, 2, False), (2, 4, True), (3, 2, True)]
)
def test_bn_into_conv_transpose(dim: int, groups: int, bias: bool, tmp_path: Path) -> None:
    model = nn.Sequential(CONVT[dim](4, 8, 3, stride=2, groups=groups, bias=bias), randomize_bn(BN[dim](8)))
    report, before, after = _roundtrip(model, (torch.randn(1, 4, *([4] * dim)),), tmp_path)
    assert before == {"ConvTranspose": 1, "BatchNormalization": 1}
    assert after == {"ConvTranspose": 1}
    assert _rule(report, "fuse_bn_into_conv")[0] == 1


@pytest.mark.parametrize("bias", [True, False])
def test_linear_bn1d_on_nc(bias: bool, tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(6, 5, bias=bias), randomize_bn(nn.BatchNorm1d(5)))
    report, before, after = _roundtrip(model, (torch.randn(3, 6),), tmp_path)
    assert before.get("BatchNormalization") == 1 and "BatchNormalization" not in after
    # the TorchScript exporter writes Linear(bias=False) as a bare MatMul: the fold adds the BN's shift
    assert after == ({"Gemm": 1} if bias else {"MatMul": 1, "Add": 1})
    assert _rule(report, "fuse_bn_into_gemm")[0] == 1


class _LinearTransposeBN(nn.Module):
    """Linear on (N, L, Cin) → transpose → BatchNorm1d on (N, C, L): the point-cloud/sequence pattern."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.bn = randomize_bn(nn.BatchNorm1d(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x).transpose(1, 2))


def test_linear_bn1d_on_ncl_through_transpose(tmp_path: Path) -> None:
    report, before, after = _roundtrip(_LinearTransposeBN(), (torch.randn(2, 7, 6),), tmp_path)
    assert before["BatchNormalization"] == 1
    assert after == {"MatMul": 1, "Add": 1, "Transpose": 1}  # the weight's Transpose is constant-folded
    assert _rule(report, "fuse_bn_into_gemm")[0] == 1


@pytest.mark.parametrize(
    ("trans_b", "alpha", "beta", "with_c"),
    [(0, 1.0, 1.0, True), (1, 1.0, 1.0, True), (0, 0.5, 0.7, True), (1, 2.0, 0.3, True), (1, 1.5, 1.0, False)],
)
def test_bn_into_gemm_attributes(trans_b: int, alpha: float, beta: float, with_c: bool, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 6) if trans_b else (6, 5)).astype(np.float32)
    c = rng.standard_normal(5).astype(np.float32)
    p = bn_arrays(5)
    inits = {"W": w, **p} | ({"C": c} if with_c else {})
    nodes = [
        helper.make_node("Gemm", ["x", "W", *(["C"] if with_c else [])], ["y"], transB=trans_b, alpha=alpha, beta=beta),
        helper.make_node("BatchNormalization", ["y", "gamma", "beta", "mean", "var"], ["z"]),
    ]
    model = make_model(nodes, [vi("x", [3, 6])], [vi("z", [3, 5])], inits)
    x = rng.standard_normal((3, 6)).astype(np.float32)
    y = alpha * x @ (w.T if trans_b else w) + (beta * c if with_c else 0)
    report = optimize(model, tmp_path / "o.onnx")
    out = onnx.load(str(tmp_path / "o.onnx"))
    assert ops(out) == {"Gemm": 1}
    gemm = next(n for n in out.graph.node if n.op_type == "Gemm")
    assert {a.name: helper.get_attribute_value(a) for a in gemm.attribute}.get("beta", 1.0) == 1.0
    assert_close(run_ort(out, {"x": x})[0], bn_numpy(y, p))
    assert _rule(report, "fuse_bn_into_gemm")[0] == 1


@pytest.mark.parametrize("add", ["none", "bias_second", "bias_first"])
def test_bn_into_matmul(add: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    w, b, p = rng.standard_normal((6, 5)).astype(np.float32), rng.standard_normal(5).astype(np.float32), bn_arrays(5)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"])]
    if add != "none":
        nodes.append(helper.make_node("Add", ["m", "b"] if add == "bias_second" else ["b", "m"], ["y"]))
    nodes.append(
        helper.make_node("BatchNormalization", ["y" if add != "none" else "m", "gamma", "beta", "mean", "var"], ["z"])
    )
    model = make_model(nodes, [vi("x", [4, 6])], [vi("z", [4, 5])], {"W": w, "b": b, **p})
    x = rng.standard_normal((4, 6)).astype(np.float32)
    report = optimize(model, tmp_path / "o.onnx")
    assert ops(tmp_path / "o.onnx") == {"MatMul": 1, "Add": 1}
    ref = bn_numpy(x @ w + (b if add != "none" else 0), p)
    assert_close(run_ort(tmp_path / "o.onnx", {"x": x})[0], ref)
    assert _rule(report, "fuse_bn_into_gemm")[0] == 1


# ---------------------------------------------------------------- BN directly before a Conv


@pytest.mark.parametrize("groups", [1, 2])
def test_bn_into_next_conv_without_padding(groups: int, tmp_path: Path) -> None:
    model = nn.Sequential(randomize_bn(nn.BatchNorm2d(4)), nn.Conv2d(4, 6, 3, groups=groups))
    report, before, after = _roundtrip(model, (torch.randn(1, 4, 8, 8),), tmp_path)
    assert before == {"BatchNormalization": 1, "Conv": 1}
    assert after == {"Conv": 1}
    assert _rule(report, "fuse_bn_into_next_conv")[0] == 1


def test_bn_into_padded_next_conv_is_refused(tmp_path: Path) -> None:
    model = nn.Sequential(randomize_bn(nn.BatchNorm2d(4)), nn.Conv2d(4, 6, 3, padding=1))
    report, before, after = _roundtrip(model, (torch.randn(1, 4, 8, 8),), tmp_path)
    assert after == before
    applied, _, reasons = _rule(report, "fuse_bn_into_next_conv")
    assert applied == 0 and any("not exact at the borders" in r for r in reasons)


# ---------------------------------------------------------------- standalone BN


def test_standalone_bn_is_kept_and_the_choice_reported(tmp_path: Path) -> None:
    model = nn.Sequential(randomize_bn(nn.BatchNorm2d(3)), nn.ReLU())
    report, before, after = _roundtrip(model, (torch.randn(1, 3, 5, 5),), tmp_path)
    assert after == before == {"BatchNormalization": 1, "Relu": 1}
    _, skipped, reasons = _rule(report, "standalone_bn")
    assert skipped == 1 and "faster than the equivalent Mul+Add" in reasons[0]


# ---------------------------------------------------------------- negative cases


class _SharedConv(nn.Module):
    """The same Conv module applied twice, each use followed by its own BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn1, self.bn2 = randomize_bn(nn.BatchNorm2d(4), 1), randomize_bn(nn.BatchNorm2d(4), 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv(x)) + self.bn2(self.conv(y))


def test_shared_conv_weight_is_skipped_then_cloned_on_request(tmp_path: Path) -> None:
    args = (torch.randn(1, 3, 6, 6), torch.randn(1, 3, 6, 6))
    report, before, after = _roundtrip(_SharedConv(), args, tmp_path)
    assert after == before
    applied, skipped, reasons = _rule(report, "fuse_bn_into_conv")
    assert applied == 0 and skipped == 2 and all("is shared with" in r for r in reasons)

    report2, _, after2 = _roundtrip(_SharedConv(), args, tmp_path, allow_weight_copies=True)
    assert "BatchNormalization" not in after2 and after2["Conv"] == 2
    assert _rule(report2, "fuse_bn_into_conv")[0] == 2


def _conv_bn_graph(**kw: object) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Conv(x, W, B) → BN, built by hand; ``kw`` overrides pieces (graph-input weights, BN options)."""
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((4, 3, 3, 3)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    p = bn_arrays(4)
    inits: dict[str, np.ndarray] = {"W": w, "B": b, **p}
    inputs = [vi("x", [1, 3, 6, 6])]
    for name in kw.get("graph_inputs", ()):
        inputs.append(vi(name, list(inits.pop(name).shape)))
    bn_outputs = ["z", *kw.get("extra_outputs", [])]
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["y"]),
        helper.make_node(
            "BatchNormalization", ["y", "gamma", "beta", "mean", "var"], bn_outputs, **kw.get("bn_attrs", {})
        ),
    ]
    model = make_model(nodes, inputs, [vi("z", [1, 4, 4, 4])], inits, opset=kw.get("opset", 17))
    return model, {"W": w, "B": b, **p}


@pytest.mark.parametrize(
    ("graph_inputs", "needle"),
    [
        (("W",), "weight 'W' is a graph input"),
        (("mean",), "running_mean 'mean' is a graph input"),
        (("var",), "running_var 'var' is a graph input"),
    ],
)
def test_non_constant_weights_or_statistics_are_refused(
    graph_inputs: tuple[str, ...], needle: str, tmp_path: Path
) -> None:
    model, _ = _conv_bn_graph(graph_inputs=graph_inputs)
    report = optimize(model, tmp_path / "o.onnx")
    assert ops(tmp_path / "o.onnx") == ops(model)
    applied, _, reasons = _rule(report, "fuse_bn_into_conv")
    assert applied == 0 and any(needle in r for r in reasons)


def test_training_mode_bn_with_three_outputs_is_refused(tmp_path: Path) -> None:
    model, _ = _conv_bn_graph(extra_outputs=["rm", "rv"], bn_attrs={"training_mode": 1}, opset=15)
    report = optimize(model, tmp_path / "o.onnx")
    assert ops(tmp_path / "o.onnx") == ops(model)
    applied, _, reasons = _rule(report, "fuse_bn_into_conv")
    assert applied == 0 and "training-mode BN" in reasons[0]
    assert "training-mode BN" in _rule(report, "standalone_bn")[2][0]


def test_fp16_fold_that_would_overflow_is_refused() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float16) * np.float16(4)
    p = bn_arrays(4, dtype=np.float16)
    p["gamma"][:] = 50
    p["var"][:] = 0  # eps=0, var=0 after fp16 rounding of 1e-12: s = inf; NORMS.md §5
    p["var"][0] = np.float16(1e-7)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["y"]),
        helper.make_node("BatchNormalization", ["y", "gamma", "beta", "mean", "var"], ["z"], epsilon=0.0),
    ]
    proto = make_model(
        nodes, [vi("x", [1, 3, 6, 6], TensorProto.FLOAT16)], [vi("z", [1, 4, 4, 4], TensorProto.FLOAT16)], {"W": w, **p}
    )
    model = ir.serde.deserialize_model(proto)
    ctx = PassContext()
    result = RulePass(FuseBatchNormIntoConv, ctx)(model)
    assert not result.modified
    assert [n.op_type for n in model.graph] == ["Conv", "BatchNormalization"]
    assert ctx.events[0].status == "skipped" and "non-finite" in ctx.events[0].reason

    p["var"][:] = np.float16(1e-4)  # finite, but |W·γ/√var| = 5e4·|W| > 65504
    p["gamma"][:] = 500
    proto = make_model(nodes, proto.graph.input, proto.graph.output, {"W": w, **p})
    model = ir.serde.deserialize_model(proto)
    ctx = PassContext()
    assert not RulePass(FuseBatchNormIntoConv, ctx)(model).modified
    assert "beyond the float16 maximum" in ctx.events[0].reason


def test_bn_on_rank3_matmul_output_without_transpose_is_refused(tmp_path: Path) -> None:
    """Linear on (N, C, Lin) then BatchNorm1d(C): the BN scales rows the weights do not have."""
    model = nn.Sequential(nn.Linear(6, 5), randomize_bn(nn.BatchNorm1d(4)))
    report, _, after = _roundtrip(model, (torch.randn(2, 4, 6),), tmp_path)
    assert after == {"MatMul": 1, "Add": 1, "BatchNormalization": 1}
    applied, _, reasons = _rule(report, "fuse_bn_into_gemm")
    assert applied == 0 and "not the layer's feature (last) axis" in reasons[0]


def test_running_mean_aliasing_bias_is_never_mutated(tmp_path: Path) -> None:
    """Deduplicated initializers: BN(y, B, B, B, gamma) with B also the conv bias and read by an Add."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.uniform(0.5, 1.5, 4).astype(np.float32)
    gamma = rng.uniform(0.5, 2.0, 4).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["y"]),
        helper.make_node("BatchNormalization", ["y", "gamma", "B", "B", "gamma"], ["z"]),
        helper.make_node("Add", ["x2", "B"], ["side"]),
    ]
    model = make_model(
        nodes,
        [vi("x", [1, 3, 6, 6]), vi("x2", [4])],
        [vi("z", [1, 4, 4, 4]), vi("side", [4])],
        {"W": w, "B": b, "gamma": gamma},
    )
    x, x2 = rng.standard_normal((1, 3, 6, 6)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    report = optimize(model, tmp_path / "o.onnx")
    out = onnx.load(str(tmp_path / "o.onnx"))
    assert ops(out) == {"Conv": 1, "Add": 1}
    y = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b)).numpy()
    z, side = run_ort(out, {"x": x, "x2": x2})
    assert_close(z, bn_numpy(y, {"gamma": gamma, "beta": b, "mean": b, "var": gamma}))
    assert_close(side, x2 + b)
    assert report.rules["fuse_bn_into_conv"].applied == 1


# ---------------------------------------------------------------- provenance and the dynamo exporter


def test_legacy_fused_conv_points_at_the_bn_module(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), randomize_bn(nn.BatchNorm2d(4)))
    _roundtrip(model, (torch.randn(1, 3, 6, 6),), tmp_path)
    out = onnx.load(str(tmp_path / "m.opt.onnx"))
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    assert module_path(conv) == "1"


class _DynamoMix(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=False)
        self.bn = randomize_bn(nn.BatchNorm2d(8), 1)
        self.dw = nn.Conv2d(8, 8, 3, groups=8, padding=1)
        self.dw_bn = randomize_bn(nn.BatchNorm2d(8), 2)
        self.fc = nn.Linear(8, 5)
        self.fc_bn = randomize_bn(nn.BatchNorm1d(5), 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.dw_bn(self.dw(torch.relu(self.bn(self.conv(x))))))
        return self.fc_bn(self.fc(y.mean(dim=(2, 3))))


def test_dynamo_export_conv_depthwise_linear(tmp_path: Path) -> None:
    report, before, after = _roundtrip(_DynamoMix(), (torch.randn(2, 3, 8, 8),), tmp_path, exporter="dynamo")
    assert before["BatchNormalization"] == 3
    assert "BatchNormalization" not in after and after["Conv"] == 2 and after["Gemm"] == 1
    out = onnx.load(str(tmp_path / "m.opt.onnx"))
    paths = sorted(module_path(n) or "" for n in out.graph.node if n.op_type in ("Conv", "Gemm"))
    assert paths == ["bn", "dw_bn", "fc_bn"]
    assert report.verification is not None and report.verification.passed


class _LeViTLinearNorm(nn.Module):
    """timm LeViT's ``LinearNorm``: Linear(bias=False) on (B, N, C), BatchNorm1d on ``flatten(0, 1)``,
    reshaped back. ``split`` > 1 makes the look-alike whose Reshape splits the channel axis."""

    def __init__(self, split: int = 1) -> None:
        super().__init__()
        self.split = split
        self.linear = nn.Linear(6, 8, bias=False)
        self.bn = randomize_bn(nn.BatchNorm1d(8 // split))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return self.bn(y.reshape(-1, 8 // self.split)).reshape_as(y)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_levit_matmul_reshape_bn1d_folds(exporter: str, tmp_path: Path) -> None:
    report, before, after = _roundtrip(_LeViTLinearNorm(), (torch.randn(2, 5, 6),), tmp_path, exporter)
    assert before["BatchNormalization"] == 1 and "BatchNormalization" not in after
    assert after.get("MatMul") == 1 and after.get("Add") == 1
    assert _rule(report, "fuse_bn_into_gemm")[0] == 1


def test_levit_reshape_that_splits_the_channel_axis_is_refused(tmp_path: Path) -> None:
    report, _, after = _roundtrip(_LeViTLinearNorm(split=2), (torch.randn(2, 5, 6),), tmp_path)
    assert after.get("BatchNormalization") == 1
    applied, _, reasons = _rule(report, "fuse_bn_into_gemm")
    assert applied == 0 and "does not keep the layer's channel (last) axis" in reasons[0], reasons
