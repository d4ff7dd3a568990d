"""CLI: every foundation command through CliRunner, and the bad-input contract (one line, exit code, no file)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from normfold.cli import app
from normfold.runtime.probe import gpu_reason

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def lenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "lenet.onnx"
    res = invoke("export", "zoo:lenet_bn", "-o", path)
    assert res.exit_code == 0, res.output
    return path


def test_backends_json_lists_all() -> None:
    res = invoke("backends", "--json")
    assert res.exit_code == 0
    names = [b["name"] for b in json.loads(res.stdout)["backends"]]
    assert names == ["torch", "ort-cpu", "ort-cuda", "ort-trt", "trt"]


def test_zoo_lists_models() -> None:
    res = invoke("zoo", "--json")
    assert res.exit_code == 0
    models = {m["name"]: m for m in json.loads(res.stdout)["models"]}
    assert "unet_resblock" in models and models["resnet_basic"]["params"] > 1000


def test_export_compare_run_roundtrip(lenet: Path, tmp_path: Path) -> None:
    res = invoke("compare", "zoo:lenet_bn", lenet, "--json")
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert payload["passed"] is True
    metrics = next(iter(payload["backends"]["ort-cpu"]["outputs"].values()))
    for key in ("max_abs", "max_rel", "cosine", "rel_l2", "mismatch_fraction", "passed", "shape_ok", "dtype_ok"):
        assert key in metrics
    out = tmp_path / "out.npz"
    res = invoke("run", lenet, "--backend", "ort-cpu", "-o", out)
    assert res.exit_code == 0, res.output
    with np.load(out) as data:
        assert next(iter(data.values())).shape == (2, 10)


def test_compare_with_npz_inputs_and_tight_tolerance_fails(lenet: Path, tmp_path: Path) -> None:
    npz = tmp_path / "in.npz"
    np.savez(npz, x=np.random.default_rng(3).standard_normal((2, 1, 28, 28)).astype(np.float32))
    res = invoke("compare", "zoo:lenet_bn", lenet, "--inputs", npz)
    assert res.exit_code == 0, res.output
    assert f"npz {npz}" in res.stdout
    res = invoke("compare", "zoo:lenet_bn", lenet, "--atol", "0", "--rtol", "0")
    assert res.exit_code == 1
    assert "FAILED" in res.stdout


def test_compare_catches_a_one_percent_classifier_weight_fault(lenet: Path, tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(lenet))
    gemm = [n for n in model.graph.node if n.op_type == "Gemm"][-1]
    init = next(i for i in model.graph.initializer if i.name == gemm.input[1])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.01), init.name))
    faulty = tmp_path / "faulty.onnx"
    onnx.save(model, str(faulty))
    res = invoke("compare", "zoo:lenet_bn", faulty, "--json")
    assert res.exit_code == 1
    assert json.loads(res.stdout)["passed"] is False


def _one_error_line(res) -> str:
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in res.output
    return lines[0]


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["export", "zoo:nope", "-o", "{tmp}/m.onnx"], 2, "unknown zoo model"),
        (["export", "{tmp}/missing.py:make", "-o", "{tmp}/m.onnx"], 2, "not found"),
        (["export", "normfold_no_such_pkg.mod:make", "-o", "{tmp}/m.onnx"], 2, "normfold_no_such_pkg"),
        (["export", "zoo:lenet_bn", "--input", "x:1xax28", "-o", "{tmp}/m.onnx"], 2, "x:1xax28"),
        (["run", "{tmp}/corrupt.onnx"], 2, "not a readable ONNX model"),
        (["run", "{tmp}/missing.onnx"], 2, "not found"),
        (["run", "{lenet}", "--backend", "cuda"], 2, "unknown backend 'cuda'"),
        (["compare", "zoo:lenet_bn", "{lenet}", "--backend", "nope"], 2, "unknown backend"),
        (["compare", "zoo:lenet_bn", "{lenet}", "--input", "x:2x28"], 2, "eager model failed on inputs of shape 2x28"),
    ],
)
def test_bad_input_one_line_error(tmp_path: Path, lenet: Path, args: list[str], code: int, needle: str) -> None:
    (tmp_path / "corrupt.onnx").write_bytes(b"definitely not protobuf \xff\xfe")
    res = invoke(*[a.format(tmp=tmp_path, lenet=lenet) for a in args])
    assert res.exit_code == code, res.output
    assert needle in _one_error_line(res)
    assert not (tmp_path / "m.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.onnx"]


def test_factory_that_raises(tmp_path: Path) -> None:
    factory = tmp_path / "factory.py"
    factory.write_text("def make():\n    raise ValueError('weights missing on purpose')\n")
    res = invoke("export", f"{factory}:make", "-o", tmp_path / "m.onnx")
    assert res.exit_code == 2
    assert "weights missing on purpose" in _one_error_line(res)
    assert not (tmp_path / "m.onnx").exists()


def test_requested_unavailable_backend_exits_3(lenet: Path) -> None:
    if gpu_reason() is None:
        pytest.skip("a GPU is visible here")
    res = invoke("compare", "zoo:lenet_bn", lenet, "--backend", "ort-cpu,ort-cuda")
    assert res.exit_code == 3
    assert "no NVIDIA GPU visible" in _one_error_line(res)


def test_verbose_shows_traceback(tmp_path: Path) -> None:
    res = invoke("--verbose", "run", tmp_path / "missing.onnx")
    assert res.exit_code == 2
    assert "Traceback" in res.stderr
