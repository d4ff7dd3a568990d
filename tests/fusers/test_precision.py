"""fp16/bf16 conversion with fp32 norm islands: structure, validity, ORT CPU numerics, auto selection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from normfold.errors import UsageError
from normfold.fusers.precision import (
    DECOMPOSED_NORM,
    AutoPrecision,
    convert_precision,
    select_fp32_islands,
)
from normfold.runtime._gpu_precision import ort_tensor_errors
from normfold.runtime.base import SessionOptions

NORMS = ("LayerNormalization", "GroupNormalization", "InstanceNormalization", "Softmax")


class HandLayerNorm(torch.nn.Module):
    """A LayerNorm written out by hand: exports as ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div (unfused)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(dim) + 0.5)
        self.bias = torch.nn.Parameter(torch.randn(dim) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(-1, keepdim=True)
        var = (x - mu).pow(2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * self.weight + self.bias


class NormNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.gn = torch.nn.GroupNorm(2, 8)
        self.inorm = torch.nn.InstanceNorm2d(8, affine=True)
        self.ln = torch.nn.LayerNorm(8)
        self.hand = HandLayerNorm(8)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inorm(self.gn(self.conv(x))).relu().mean((2, 3))
        return torch.softmax(self.fc(self.hand(self.ln(y))), -1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module, np.ndarray]:
    torch.manual_seed(0)
    model = NormNet().eval()
    x = torch.randn(2, 3, 8, 8)
    path = tmp_path_factory.mktemp("prec") / "normnet.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=21, input_names=["x"])
    return path, model, x.numpy()


def _producer(model: onnx.ModelProto, name: str) -> onnx.NodeProto | None:
    return next((n for n in model.graph.node if name in n.output), None)


def _attr(node: onnx.NodeProto, name: str) -> int:
    return next(a.i for a in node.attribute if a.name == name)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_fp16_islands_structure_and_eager_numerics(exported: tuple, tmp_path: Path) -> None:
    src, model, x = exported
    report = convert_precision(src, tmp_path / "m16.onnx", keep_io_types=True)
    out = onnx.load(str(tmp_path / "m16.onnx"))
    onnx.checker.check_model(out, full_check=True)
    kinds = {i.kind for i in report.fp32_islands}
    assert set(NORMS) | {DECOMPOSED_NORM} <= kinds
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*out.graph.value_info, *out.graph.output]}
    for node in out.graph.node:
        if node.op_type in NORMS:
            assert types[node.output[0]] == TensorProto.FLOAT, node.name
            feed = _producer(out, node.input[0])
            assert feed is not None, node.name
            if feed.op_type == "Cast":
                assert _attr(feed, "to") == TensorProto.FLOAT, node.name
            else:  # GroupNorm → InstanceNorm: adjacent islands share fp32 without a Cast pair
                assert feed.op_type in NORMS and types[node.input[0]] == TensorProto.FLOAT, node.name
    (hand,) = [i for i in report.fp32_islands if i.kind == DECOMPOSED_NORM]
    assert {n.op_type for n in hand.nodes} >= {"ReduceMean", "Sub", "Pow", "Add", "Sqrt", "Div"}
    for name in (n.name for n in hand.nodes):
        node = next(n for n in out.graph.node if n.name == name)
        assert types[node.output[0]] == TensorProto.FLOAT, name
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    assert types[conv.output[0]] == TensorProto.FLOAT16
    assert out.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert out.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT

    got = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.inference_mode():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-2, rtol=1e-2)
    assert _cosine(got, want) > 0.999
    assert report.to_dict()["casts_inserted"] == report.casts_inserted > 0


def test_low_io_types_keep_output_names(exported: tuple) -> None:
    src, model, x = exported
    report = convert_precision(src)
    assert report.path is None and report.model is not None
    out = report.model
    assert out.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert out.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert out.graph.output[0].name == onnx.load(str(src), load_external_data=False).graph.output[0].name
    session = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x.astype(np.float16)})[0]
    with torch.inference_mode():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got.astype(np.float32), want, atol=1e-2, rtol=1e-2)


def test_bf16_keeps_ops_without_a_bf16_variant_in_fp32(exported: tuple) -> None:
    src, _, _ = exported
    report = convert_precision(src, precision="bf16")
    assert report.model is not None
    onnx.checker.check_model(report.model, full_check=True)
    conv = [i for i in report.fp32_islands if i.kind == "Conv"]
    assert conv, "Conv-11 has no bf16 variant at opset 21; it must stay fp32"
    gemm = next(n for n in report.model.graph.node if n.op_type == "Gemm")
    assert _producer(report.model, gemm.input[0]).op_type == "Cast"
    types = {vi.name: vi.type.tensor_type.elem_type for vi in report.model.graph.value_info}
    assert types[gemm.output[0]] == TensorProto.BFLOAT16


def test_fp16_initializer_overflow_is_clamped_and_reported() -> None:
    w = numpy_helper.from_array(np.array([1.0, 1e5, -2e5, 1e-9], np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [w],
    )
    src = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    report = convert_precision(src, keep_io_types=True)
    (issue,) = report.issues
    assert (issue.tensor, issue.clamped, issue.flushed_to_zero) == ("w", 2, 1)
    assert issue.max_abs == pytest.approx(2e5)
    converted = numpy_helper.to_array(report.model.graph.initializer[0])
    assert converted.dtype == np.float16
    np.testing.assert_array_equal(converted, np.array([1.0, 65504, -65504, 0], np.float16))


def _two_hand_layernorms(eps: float = 1e-5) -> onnx.ModelProto:
    """x[4,16] → LN_a → LN_b, both decomposed; LN_a's input is large enough to overflow (x-μ)² in fp16."""
    nodes, inits = (
        [],
        [
            numpy_helper.from_array(np.array([-1], np.int64), "axes"),
            numpy_helper.from_array(np.array(2.0, np.float32), "two"),
            numpy_helper.from_array(np.array(eps, np.float32), "eps"),
        ],
    )
    src = "x"
    for tag in ("a", "b"):
        inits += [
            numpy_helper.from_array(np.linspace(0.5, 1.5, 16).astype(np.float32), f"g_{tag}"),
            numpy_helper.from_array(np.linspace(-0.1, 0.1, 16).astype(np.float32), f"b_{tag}"),
        ]
        nodes += [
            helper.make_node("ReduceMean", [src, "axes"], [f"mu_{tag}"], name=f"mean_{tag}"),
            helper.make_node("Sub", [src, f"mu_{tag}"], [f"c_{tag}"], name=f"sub_{tag}"),
            helper.make_node("Pow", [f"c_{tag}", "two"], [f"sq_{tag}"], name=f"pow_{tag}"),
            helper.make_node("ReduceMean", [f"sq_{tag}", "axes"], [f"var_{tag}"], name=f"var_{tag}"),
            helper.make_node("Add", [f"var_{tag}", "eps"], [f"ve_{tag}"], name=f"addeps_{tag}"),
            helper.make_node("Sqrt", [f"ve_{tag}"], [f"sd_{tag}"], name=f"sqrt_{tag}"),
            helper.make_node("Div", [f"c_{tag}", f"sd_{tag}"], [f"n_{tag}"], name=f"div_{tag}"),
            helper.make_node("Mul", [f"n_{tag}", f"g_{tag}"], [f"s_{tag}"], name=f"scale_{tag}"),
            helper.make_node("Add", [f"s_{tag}", f"b_{tag}"], [f"y_{tag}"], name=f"shift_{tag}"),
        ]
        src = f"y_{tag}"
    graph = helper.make_graph(
        nodes,
        "two_ln",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y_b", TensorProto.FLOAT, [4, 16])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    return onnx.shape_inference.infer_shapes(model)


def test_auto_keeps_only_the_norm_that_creates_the_error() -> None:
    """ORT CPU as the error source: stored fp16 variance of LN_a overflows; LN_b is fine."""
    src = _two_hand_layernorms()
    x = (np.random.default_rng(0).standard_normal((4, 16)) * 400).astype(np.float32)
    # ORT's LayerNormFusion mis-fuses a Cast→fp16 decomposed LN (see select_fp32_islands): measure unfused.
    error_fn = ort_tensor_errors(src, {"x": x}, options=SessionOptions(graph_optimization_level="disable"))
    everything_low = convert_precision(src, keep_io_types=True, fp32_ops=())
    errors = error_fn(everything_low.model)
    assert errors["var_a"] == float("inf") and errors["var_b"] < 1e-2  # (x-μ)² > 65504 for LN_a only

    auto = AutoPrecision(error_fn, threshold=1e-2)
    kept, rounds = select_fp32_islands(src, auto, keep_io_types=True)
    assert kept == ["var_a"]
    assert [r.added for r in rounds] == [["var_a"], []]
    assert rounds[1].island_errors["var_b"][1] < 1e-2

    report = convert_precision(src, keep_io_types=True, auto=auto)
    assert [i.anchor for i in report.fp32_islands] == ["var_a"]
    assert report.low_islands == ["var_b"]
    assert [r["added"] for r in report.to_dict()["auto_rounds"]] == [["var_a"], []]
    assert error_fn(report.model)["var_b"] < 1e-2
    opts = ort.SessionOptions()  # ORT's LayerNormFusion mis-fuses a Cast→fp16 decomposed LN (docstring)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(report.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    ref = ort.InferenceSession(src.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, atol=1e-2, rtol=1e-2)


def test_auto_does_not_blame_a_norm_for_inherited_error() -> None:
    """A callable error source where everything after an fp16 LN_a is broken (as on a real fp16 GPU)."""
    src = _two_hand_layernorms()
    seen_low: list[bool] = []

    def error_fn(model: onnx.ModelProto) -> dict[str, float]:
        types = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.value_info}
        a_low = types["sq_a"] == TensorProto.FLOAT16
        seen_low.append(a_low)
        names = ["mu_a", "c_a", "sq_a", "var_a", "ve_a", "sd_a", "n_a", "s_a", "y_a"]
        names += [n.replace("_a", "_b") for n in names]
        broken = names[2:] if a_low else []
        return {n: (float("inf") if n in broken else 1e-3) for n in names}

    kept, rounds = select_fp32_islands(src, AutoPrecision(error_fn), keep_io_types=True)
    assert seen_low == [True, False]
    assert kept == ["var_a"]
    assert rounds[0].island_errors["var_b"] == (float("inf"), float("inf"))
    assert rounds[1].added == []


def test_auto_measures_with_fp32_io_whatever_is_kept() -> None:
    """bf16 without keep_io_types: the error source is still fed fp32 (it cannot build bf16 feeds)."""
    src = _two_hand_layernorms()
    input_types: list[int] = []

    def error_fn(model: onnx.ModelProto) -> dict[str, float]:
        input_types.extend(i.type.tensor_type.elem_type for i in model.graph.input)
        return {}

    select_fp32_islands(src, AutoPrecision(error_fn), precision="bf16", keep_io_types=False)
    assert input_types and set(input_types) == {TensorProto.FLOAT}
    final = convert_precision(src, precision="bf16", keep_io_types=False, auto=AutoPrecision(error_fn))
    assert {i.type.tensor_type.elem_type for i in final.model.graph.input} == {TensorProto.BFLOAT16}


def test_unknown_fp32_ops_are_refused() -> None:
    with pytest.raises(UsageError, match=r"unknown op type.*NoSuchOp"):
        convert_precision(_two_hand_layernorms(), fp32_ops=("Softmax", "NoSuchOp"))
    report = convert_precision(_two_hand_layernorms(), fp32_ops=("Softmax", DECOMPOSED_NORM))
    assert report.fp32_islands


def test_custom_plugin_norms_stay_fp32() -> None:
    """Nodes that call a model-local function (the TensorRT-plugin norms) are islands too."""
    from normfold.exporter.custom_norms import to_custom_norms

    scale = numpy_helper.from_array(np.linspace(0.5, 1.5, 4).astype(np.float32), "s")
    bias = numpy_helper.from_array(np.linspace(-0.5, 0.5, 4).astype(np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("GroupNormalization", ["r", "s", "b"], ["n"], num_groups=2, epsilon=0.5, name="gn"),
            helper.make_node("Relu", ["n"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4, 5])],
        [scale, bias],
    )
    native = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    custom = to_custom_norms(native).model
    report = convert_precision(custom)
    (island,) = report.fp32_islands
    assert island.kind == "GroupNormalizationPlugin"
    plugin = next(n for n in report.model.graph.node if n.op_type == "GroupNormalizationPlugin")
    cast = _producer(report.model, plugin.input[0])
    assert cast.op_type == "Cast" and _attr(cast, "to") == TensorProto.FLOAT
    x = np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float32)
    session = ort.InferenceSession(report.model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x.astype(np.float16)})[0]
    want = ort.InferenceSession(native.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got.astype(np.float32), want, atol=1e-2, rtol=1e-2)


def test_convert_cli_refuses_an_unknown_fp32_op(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from normfold.cli import app

    src = tmp_path / "m.onnx"
    onnx.save(_two_hand_layernorms(), str(src))
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(app, ["convert", str(src), "-o", str(out), "--fp32-ops", "Softmax,NoSuchOp"])
    assert result.exit_code == 2
    assert "error: unknown op type(s) in fp32_ops: NoSuchOp" in result.output
    assert "Traceback" not in result.output and not out.exists()
    ok = CliRunner().invoke(
        app, ["convert", str(src), "-o", str(out), "--fp32-ops", "Softmax,DecomposedNorm", "--json"]
    )
    assert ok.exit_code == 0 and out.exists()
