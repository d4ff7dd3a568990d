"""External data under hostile locations: every command refuses (exit 2, tensor and location named) and
nothing is read or written outside the model's folder; a benign model's data travels into the repository."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from normfold.cli import app
from normfold.errors import OnnxLoadError
from normfold.runtime.onnxruntime import create_session
from normfold.serve.triton import write_triton_repo

runner = CliRunner()

WEIGHT = np.arange(12, dtype=np.float32).reshape(4, 3)


def _external_model(folder: Path, location: str, *, name: str = "m.onnx", write_data: bool = True) -> Path:
    """x:[1,4] @ w → y:[1,3] with ``w`` stored externally at ``location`` (written when it is benign)."""
    folder.mkdir(parents=True, exist_ok=True)
    w = numpy_helper.from_array(WEIGHT, "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(WEIGHT.nbytes))):
        w.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    if write_data:
        (folder / location).parent.mkdir(parents=True, exist_ok=True)
        (folder / location).write_bytes(WEIGHT.tobytes())
    path = folder / name
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A file outside the model's folder that a hostile model tries to reach."""
    outside = tmp_path / "outside"
    outside.mkdir()
    path = outside / "secret.bin"
    path.write_bytes(b"S" * WEIGHT.nbytes)
    return path


def _hostile(tmp_path: Path, secret: Path, kind: str) -> tuple[Path, str]:
    folder = tmp_path / "a" / "b" / "models"
    if kind == "passwd":
        location = "../../../../../../../../../../etc/passwd"
    elif kind == "traversal":
        location = "../../x/payload"
    elif kind == "absolute":
        location = str(secret)
    else:  # a symlink inside the folder that points at a file outside it
        location = "weights.bin"
        folder.mkdir(parents=True)
        os.symlink(secret, folder / location)
    return _external_model(folder, location, write_data=False), location


KINDS = ["passwd", "traversal", "symlink", "absolute"]


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.mark.parametrize("kind", KINDS)
def test_triton_refuses_and_writes_nothing(tmp_path: Path, secret: Path, kind: str) -> None:
    model, location = _hostile(tmp_path, secret, kind)
    before = _files(tmp_path)
    repo = tmp_path / "repo"
    result = runner.invoke(app, ["triton", str(model), "--repo", str(repo)])
    assert result.exit_code == 2, result.output
    assert "'w'" in result.output and location in result.output
    assert "Traceback" not in result.output
    assert _files(tmp_path) == before  # no repository, no payload, nothing beside the secret


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "command",
    [["run"], ["optimize", "-o", "{out}"], ["bench", "--duration", "0.1"], ["convert", "-o", "{out}"]],
    ids=["run", "optimize", "bench", "convert"],
)
def test_every_reader_refuses(tmp_path: Path, secret: Path, kind: str, command: list[str]) -> None:
    model, location = _hostile(tmp_path, secret, kind)
    out = tmp_path / "out.onnx"
    args = [command[0], str(model), *(a.format(out=out) for a in command[1:])]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "'w'" in result.output and location in result.output
    assert not out.exists()


def test_library_error_names_the_rule(tmp_path: Path, secret: Path) -> None:
    model, _ = _hostile(tmp_path, secret, "symlink")
    with pytest.raises(OnnxLoadError, match="outside"):
        create_session(model, ["CPUExecutionProvider"])


def test_data_travels_into_the_repository_and_loads(tmp_path: Path) -> None:
    model = _external_model(tmp_path / "src", "weights/w.bin")
    report = write_triton_repo(model, tmp_path / "repo", name="m")
    version = report.model_dir / "1"
    assert (version / "weights" / "w.bin").read_bytes() == WEIGHT.tobytes()
    assert any("weights/w.bin" in n for n in report.notes)
    sess = create_session(version / "model.onnx", ["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": np.ones((1, 4), np.float32)})
    np.testing.assert_allclose(y, np.ones((1, 4), np.float32) @ WEIGHT)
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["m"]  # no staging left behind


def test_failed_overwrite_keeps_the_old_model_dir(tmp_path: Path) -> None:
    good = _external_model(tmp_path / "src", "w.bin")
    repo = tmp_path / "repo"
    write_triton_repo(good, repo, name="m")
    old = {p.relative_to(repo): p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    bad = _external_model(tmp_path / "bad", "missing.bin", write_data=False)
    with pytest.raises(OnnxLoadError, match=r"missing\.bin"):
        write_triton_repo(bad, repo, name="m", overwrite=True)
    assert {p.relative_to(repo): p.read_bytes() for p in repo.rglob("*") if p.is_file()} == old


def test_truncated_data_file_is_named(tmp_path: Path) -> None:
    model = _external_model(tmp_path, "w.bin")
    (tmp_path / "w.bin").write_bytes(b"\0" * 8)
    with pytest.raises(OnnxLoadError, match="too short"):
        write_triton_repo(model, tmp_path / "repo", name="m")
    assert not (tmp_path / "repo").exists()
    assert onnx.load(str(model), load_external_data=False).graph.node  # the model itself is untouched


@pytest.mark.parametrize("kind", ["traversal", "symlink"])
def test_compare_per_layer_refuses(tmp_path: Path, secret: Path, kind: str) -> None:
    model, location = _hostile(tmp_path, secret, kind)
    factory = tmp_path / "f.py"
    factory.write_text(
        "import torch\n\n\ndef make():\n    return torch.nn.Linear(4, 3, bias=False).eval(), (torch.ones(1, 4),)\n"
    )
    result = runner.invoke(app, ["compare", f"{factory}:make", str(model), "--per-layer"])
    assert result.exit_code == 2, result.output
    assert "'w'" in result.output and location in result.output
