"""Backends: real probes, ORT CPU runner validation, eager runner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from normfold.errors import BackendUnavailableError, InputSpecError, OnnxLoadError, UnknownBackendError
from normfold.runtime import get_backend, list_backends, parse_backends
from normfold.runtime.probe import gpu_reason


def _relu_model(path: Path, shape: list[int | str]) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(path))
    return path


def test_list_backends_names_all_five_with_reasons() -> None:
    statuses = {s.name: s for s in list_backends()}
    assert list(statuses) == ["torch", "ort-cpu", "ort-cuda", "ort-trt", "trt"]
    assert statuses["ort-cpu"].available and statuses["torch"].available
    for name in ("ort-cuda", "ort-trt", "trt"):
        s = statuses[name]
        assert s.available == (s.reason == "")
        if gpu_reason() is not None:
            assert not s.available
            assert "no NVIDIA GPU visible" in s.reason


def test_ort_gpu_probe_reports_the_loader_failure() -> None:
    if gpu_reason() is None:
        pytest.skip("a GPU is visible here; the failure text cannot be observed")
    reason = get_backend("ort-cuda").probe()
    assert reason is not None
    assert "CUDAExecutionProvider" in reason and "failed" in reason


def test_unavailable_backend_raises_with_reason(tmp_path: Path) -> None:
    if gpu_reason() is None:
        pytest.skip("a GPU is visible here")
    with pytest.raises(BackendUnavailableError, match="cannot run here"):
        get_backend("ort-cuda").load(_relu_model(tmp_path / "m.onnx", [2]))


def test_parse_backends() -> None:
    assert parse_backends("ort-cpu, torch,ort-cpu") == ["ort-cpu", "torch"]
    with pytest.raises(UnknownBackendError, match="unknown backend 'cuda'"):
        parse_backends("cuda")
    with pytest.raises(UnknownBackendError):
        parse_backends(" , ")


def test_ort_cpu_runs_and_validates_feeds(tmp_path: Path) -> None:
    path = _relu_model(tmp_path / "m.onnx", ["N", 3])
    with get_backend("ort-cpu").load(path) as runner:
        x = np.array([[-1, 2, -3], [4, -5, 6]], np.float32)
        np.testing.assert_array_equal(runner.infer({"x": x})["y"], np.maximum(x, 0))
        with pytest.raises(InputSpecError, match="received incompatible shape: \\(2, 4\\)"):
            runner.infer({"x": np.zeros((2, 4), np.float32)})
        with pytest.raises(InputSpecError, match="received dtype float64"):
            runner.infer({"x": np.zeros((2, 3))})
        with pytest.raises(InputSpecError, match="missing \\['x'\\]"):
            runner.infer({"z": x})


def test_corrupt_model_is_an_onnx_load_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    with pytest.raises(OnnxLoadError):
        get_backend("ort-cpu").load(bad)
    with pytest.raises(OnnxLoadError, match="not found"):
        get_backend("ort-cpu").load(tmp_path / "missing.onnx")
