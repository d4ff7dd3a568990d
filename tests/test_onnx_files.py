"""normfold.onnx_files: the location rules, lazy loading and the atomic model + data pair."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from normfold import onnx_files
from normfold.errors import OnnxLoadError, UsageError
from normfold.fusers import optimize
from normfold.runtime.onnxruntime import create_session

W = np.arange(1024, dtype=np.float32).reshape(32, 32) / 1024  # 4 KB: above the inline threshold


def _model(path: Path, *, external: bool) -> Path:
    """x:[1,32] @ w + b → y, saved with ``w`` and ``b`` external when asked."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
        [numpy_helper.from_array(W, "w"), numpy_helper.from_array(np.ones(32, np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx_files.save_proto(model, path, external=external)
    return path


def _y(path: Path) -> np.ndarray:
    (y,) = create_session(path, ["CPUExecutionProvider"]).run(None, {"x": np.ones((1, 32), np.float32)})
    return y


@pytest.mark.parametrize(
    ("location", "real"),
    [("w.bin", "w.bin"), ("./w.bin", "w.bin"), ("sub//w.bin", "sub/w.bin"), ("sub/./w.bin", "sub/w.bin")],
)
def test_benign_locations_are_normalised(tmp_path: Path, location: str, real: str) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / real).write_bytes(b"x")
    assert onnx_files.resolve_location(tmp_path, "w", location) == (tmp_path / real).resolve()


@pytest.mark.parametrize(
    ("location", "why"),
    [
        ("", "empty"),
        ("../w.bin", r"'\.\.'"),
        ("sub/../../w.bin", r"'\.\.'"),
        ("/etc/passwd", "absolute"),
        ("C:\\w.bin", "absolute"),
        ("sub", "not a regular file"),
        ("nope.bin", "does not exist"),
    ],
)
def test_hostile_locations_name_tensor_and_rule(tmp_path: Path, location: str, why: str) -> None:
    (tmp_path / "sub").mkdir()
    with pytest.raises(OnnxLoadError, match=why) as info:
        onnx_files.resolve_location(tmp_path, "w", location)
    assert "'w'" in str(info.value)


def test_save_keeps_external_data_beside_the_model_and_loads_lazily(tmp_path: Path) -> None:
    path = _model(tmp_path / "m.onnx", external=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]  # no staging left
    model = onnx_files.load_ir(path)
    w = model.graph.initializers["w"].const_value
    assert isinstance(w, ir.ExternalTensor)
    np.testing.assert_array_equal(w.numpy(), W)
    np.testing.assert_allclose(_y(path), np.ones((1, 32)) @ W + 1, rtol=1e-6)


def test_inline_save_and_threshold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _model(tmp_path / "a.onnx", external=False)
    assert not (tmp_path / "a.onnx.data").exists()
    monkeypatch.setenv("NORMFOLD_INLINE_LIMIT", "0")
    proto = onnx.load(str(tmp_path / "a.onnx"))
    onnx_files.save_proto(proto, tmp_path / "b.onnx")
    assert (tmp_path / "b.onnx.data").is_file()
    assert proto.graph.initializer[0].raw_data  # the caller's proto is untouched
    monkeypatch.setenv("NORMFOLD_INLINE_LIMIT", "lots")
    with pytest.raises(UsageError, match="NORMFOLD_INLINE_LIMIT"):
        onnx_files.save_proto(proto, tmp_path / "c.onnx")


def test_optimize_onto_itself_keeps_reading_the_old_data(tmp_path: Path) -> None:
    """The new data file replaces the old by rename, so the mapped input stays valid while it is written."""
    path = _model(tmp_path / "m.onnx", external=True)
    expected = _y(path)
    optimize(path, path)
    assert onnx_files.uses_external_data(path)
    np.testing.assert_allclose(_y(path), expected, rtol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_digest_follows_the_weights(tmp_path: Path) -> None:
    path = _model(tmp_path / "m.onnx", external=True)
    before = onnx_files.model_digest(path)
    data = bytearray((tmp_path / "m.onnx.data").read_bytes())
    data[0] ^= 0xFF
    (tmp_path / "m.onnx.data").write_bytes(bytes(data))
    assert onnx_files.model_digest(path) != before
