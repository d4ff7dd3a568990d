"""Triton repository writer: the config parses into Triton's ModelConfig and matches the ONNX model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper, numpy_helper
from tritonclient.grpc import model_config_pb2

from normfold.errors import OnnxLoadError, UsageError
from normfold.serve.triton import render_config, write_triton_repo


def _model(path: Path, *, batch: str | int = "N", out_type: int = TensorProto.FLOAT) -> Path:
    """x:[batch,4] f32, ids:[batch] i64 → y:[batch,3] (MatMul), n:[batch] (Cast of ids)."""
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y0"]),
        helper.make_node("Cast", ["y0"], ["y"], to=out_type),
        helper.make_node("Cast", ["ids"], ["n"], to=TensorProto.INT32),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [batch]),
        ],
        [
            helper.make_tensor_value_info("y", out_type, [batch, 3]),
            helper.make_tensor_value_info("n", TensorProto.INT32, [batch]),
        ],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_unbatched_repo_layout_and_config_match_onnx(tmp_path: Path) -> None:
    onnx_path = _model(tmp_path / "tiny.onnx")
    report = write_triton_repo(onnx_path, tmp_path / "repo", name="tiny", kind="cpu", instances=2)
    assert report.model_dir == tmp_path / "repo" / "tiny"
    assert os.fspath(report) == str(report.model_dir)
    assert (report.model_dir / "1" / "model.onnx").read_bytes() == onnx_path.read_bytes()
    assert report.validated_with_protobuf
    cfg = _parse(report.config_path)
    assert cfg.name == "tiny"
    assert cfg.platform == "onnxruntime_onnx"
    assert cfg.max_batch_size == 0
    got_in = {(t.name, model_config_pb2.DataType.Name(t.data_type), tuple(t.dims)) for t in cfg.input}
    got_out = {(t.name, model_config_pb2.DataType.Name(t.data_type), tuple(t.dims)) for t in cfg.output}
    assert got_in == {("x", "TYPE_FP32", (-1, 4)), ("ids", "TYPE_INT64", (-1,))}
    assert got_out == {("y", "TYPE_FP32", (-1, 3)), ("n", "TYPE_INT32", (-1,))}
    assert [(g.count, model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind)) for g in cfg.instance_group] == [
        (2, "KIND_CPU")
    ]
    assert not cfg.HasField("dynamic_batching")
    assert not cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert report.to_dict()["inputs"] == [
        {"name": "x", "data_type": "TYPE_FP32", "dims": [-1, 4]},
        {"name": "ids", "data_type": "TYPE_INT64", "dims": [-1]},
    ]


def test_batched_strips_batch_dim_and_writes_dynamic_batching(tmp_path: Path) -> None:
    onnx_path = _model(tmp_path / "m.onnx", out_type=TensorProto.FLOAT16)
    report = write_triton_repo(
        onnx_path,
        tmp_path / "repo",
        name="m",
        max_batch=8,
        dynamic_batching=True,
        preferred_batch_sizes=(4, 8),
        max_queue_delay_us=100,
    )
    cfg = _parse(report.config_path)
    assert cfg.max_batch_size == 8
    assert {t.name: tuple(t.dims) for t in cfg.input} == {"x": (4,), "ids": ()}
    assert {t.name: model_config_pb2.DataType.Name(t.data_type) for t in cfg.output} == {
        "y": "TYPE_FP16",
        "n": "TYPE_INT32",
    }
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 100
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(cfg.instance_group[0].kind) == "KIND_AUTO"


def test_fixed_batch_dim_with_max_batch_is_an_error(tmp_path: Path) -> None:
    onnx_path = _model(tmp_path / "m.onnx", batch=1)
    with pytest.raises(UsageError, match=r"fixed first dim 1.*--dynamic-batch"):
        write_triton_repo(onnx_path, tmp_path / "repo", max_batch=4)
    assert not (tmp_path / "repo" / "m").exists()


def test_fp16_enables_ort_tensorrt_accelerator(tmp_path: Path) -> None:
    onnx_path = _model(tmp_path / "m.onnx")
    report = write_triton_repo(onnx_path, tmp_path / "repo", fp16=True)
    cfg = _parse(report.config_path)
    (acc,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert acc.name == "tensorrt"
    assert acc.parameters["precision_mode"] == "FP16"
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(cfg.instance_group[0].kind) == "KIND_GPU"
    fp32 = write_triton_repo(onnx_path, tmp_path / "repo", name="m32", trt_accelerator=True)
    (acc32,) = _parse(fp32.config_path).optimization.execution_accelerators.gpu_execution_accelerator
    assert acc32.parameters["precision_mode"] == "FP32"
    with pytest.raises(UsageError, match="GPU instances"):
        write_triton_repo(onnx_path, tmp_path / "repo", name="c", trt_accelerator=True, kind="cpu")


def test_tensorrt_platform_needs_an_engine(tmp_path: Path) -> None:
    onnx_path = _model(tmp_path / "m.onnx")
    with pytest.raises(UsageError, match=r"serialized TensorRT engine \(model.plan\), and none was given"):
        write_triton_repo(onnx_path, tmp_path / "repo", platform="tensorrt")
    assert not (tmp_path / "repo" / "m").exists()
    empty = tmp_path / "empty.plan"
    empty.write_bytes(b"")
    with pytest.raises(UsageError, match="does not exist or is empty"):
        write_triton_repo(onnx_path, tmp_path / "repo", platform="tensorrt", engine_path=empty)
    engine = tmp_path / "m.plan"
    engine.write_bytes(b"\x01engine-bytes")
    report = write_triton_repo(onnx_path, tmp_path / "repo", platform="tensorrt", engine_path=engine)
    assert (report.model_dir / "1" / "model.plan").read_bytes() == b"\x01engine-bytes"
    assert not (report.model_dir / "1" / "model.onnx").exists()
    cfg = _parse(report.config_path)
    assert cfg.platform == "tensorrt_plan"
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(cfg.instance_group[0].kind) == "KIND_GPU"


def test_refuses_to_clobber_unless_overwrite(tmp_path: Path) -> None:
    onnx_path = _model(tmp_path / "m.onnx")
    first = write_triton_repo(onnx_path, tmp_path / "repo", instances=1)
    (first.model_dir / "keep.txt").write_text("user file")
    with pytest.raises(UsageError, match="not empty"):
        write_triton_repo(onnx_path, tmp_path / "repo", instances=3)
    assert (first.model_dir / "keep.txt").exists()
    second = write_triton_repo(onnx_path, tmp_path / "repo", instances=3, overwrite=True)
    assert _parse(second.config_path).instance_group[0].count == 3
    assert not (second.model_dir / "keep.txt").exists()
    leftovers = [p.name for p in (tmp_path / "repo").iterdir()]
    assert leftovers == ["m"]


def test_bad_inputs_are_usage_errors(tmp_path: Path) -> None:
    onnx_path = _model(tmp_path / "m.onnx")
    with pytest.raises(OnnxLoadError, match="does not exist"):
        write_triton_repo(tmp_path / "missing.onnx", tmp_path / "repo")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all \xff\xff")
    with pytest.raises(OnnxLoadError, match="not a readable ONNX model"):
        write_triton_repo(tmp_path / "junk.onnx", tmp_path / "repo")
    with pytest.raises(UsageError, match="needs max_batch > 0"):
        write_triton_repo(onnx_path, tmp_path / "repo", dynamic_batching=True)
    with pytest.raises(UsageError, match="not a valid directory name"):
        write_triton_repo(onnx_path, tmp_path / "repo", name="a/b")
    with pytest.raises(UsageError, match=r"outside 1\.\.max_batch"):
        write_triton_repo(onnx_path, tmp_path / "repo", max_batch=4, dynamic_batching=True, preferred_batch_sizes=(16,))


def test_render_escapes_odd_names() -> None:
    from normfold.serve.triton import TritonTensor

    odd = 'in"put\\ü'
    text = render_config(
        name="m",
        platform="onnxruntime",
        max_batch=0,
        inputs=[TritonTensor(odd, "TYPE_FP32", (2,))],
        outputs=[TritonTensor("o", "TYPE_FP32", (2,))],
        dynamic_batching=False,
        instances=1,
        kind="cpu",
        trt_accelerator=False,
        fp16=False,
    )
    cfg = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert cfg.input[0].name == odd
