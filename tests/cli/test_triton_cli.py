"""`normfold triton` through CliRunner: the repository it writes, and its error contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper, numpy_helper
from tritonclient.grpc import model_config_pb2
from typer.testing import CliRunner

from normfold.cli import app
from normfold.runtime.probe import gpu_reason

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def model(tmp_path: Path) -> Path:
    w = numpy_helper.from_array(np.ones((4, 2), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [w],
    )
    path = tmp_path / "mm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(path))
    return path


def test_triton_writes_a_parseable_repo(model: Path, tmp_path: Path) -> None:
    res = invoke(
        "triton",
        model,
        "--repo",
        tmp_path / "repo",
        "--name",
        "mm",
        "--max-batch",
        "16",
        "--dynamic-batching",
        "--instances",
        "2",
        "--fp16",
    )
    assert res.exit_code == 0, res.output
    assert "wrote" in res.stdout and "tritonserver --model-repository=" in res.stdout
    cfg = text_format.Parse((tmp_path / "repo/mm/config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (cfg.name, cfg.platform, cfg.max_batch_size) == ("mm", "onnxruntime_onnx", 16)
    assert [(i.name, list(i.dims)) for i in cfg.input] == [("x", [4])]
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("y", [2])]
    assert cfg.HasField("dynamic_batching") and cfg.instance_group[0].count == 2
    acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert acc.name == "tensorrt" and acc.parameters["precision_mode"] == "FP16"
    assert (tmp_path / "repo/mm/1/model.onnx").is_file()

    again = invoke("triton", model, "--repo", tmp_path / "repo", "--name", "mm", "--json")
    assert again.exit_code == 2 and "not empty" in again.stderr
    replaced = invoke("triton", model, "--repo", tmp_path / "repo", "--name", "mm", "--overwrite", "--json")
    assert replaced.exit_code == 0
    assert json.loads(replaced.stdout)["max_batch"] == 0


def test_tensorrt_platform_without_engine_is_a_clear_error(model: Path, tmp_path: Path) -> None:
    if gpu_reason() is None:
        pytest.skip("a GPU is visible: the engine would be built")
    res = invoke("triton", model, "--repo", tmp_path / "repo", "--platform", "tensorrt")
    assert res.exit_code == 3
    assert "cannot build a TensorRT engine" in res.stderr and "no NVIDIA GPU visible" in res.stderr
    assert not (tmp_path / "repo" / "mm").exists()
    plan = tmp_path / "prebuilt.plan"
    plan.write_bytes(b"engine")
    ok = invoke("triton", model, "--repo", tmp_path / "repo", "--platform", "tensorrt", "--engine", plan)
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "repo/mm/1/model.plan").read_bytes() == b"engine"


def test_bad_usage_exits_2(model: Path, tmp_path: Path) -> None:
    res = invoke("triton", model, "--repo", tmp_path / "repo", "--dynamic-batching")
    assert res.exit_code == 2 and "needs max_batch > 0" in res.stderr
    res = invoke("triton", model, "--repo", tmp_path / "repo", "--kind", "tpu")
    assert res.exit_code == 2 and "instance kind 'tpu'" in res.stderr
