"""`normfold bench` through typer's CliRunner: outputs, exit codes 0/1/2/3."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from normfold.cli import app
from normfold.runtime.probe import ort_provider_reason

runner = CliRunner()
FAST = ["--warmup", "1", "--iters", "5"]


def _tiny(path: Path, batch: int | str) -> Path:
    w = numpy_helper.from_array(np.eye(8, dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 8])],
        [w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(path))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli_bench")
    factory = d / "eye.py"
    factory.write_text(
        "import torch\n\n"
        "class Eye(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return x @ torch.eye(8)\n\n"
        "def factory():\n"
        "    return Eye(), (torch.zeros(1, 8),)\n"
    )
    return {"static": _tiny(d / "static.onnx", 1), "dynamic": _tiny(d / "dynamic.onnx", "N"), "factory": factory}


def test_table_json_and_plot(tmp_path: Path, models: dict[str, Path]) -> None:
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    args = ["bench", str(models["dynamic"]), "--batch", "1,4", *FAST, "--json", str(out_json), "--plot", str(out_png)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for header in ("first run", "p50", "p99", "samples/s", "copies"):
        assert header in result.output
    assert "intra-op" in result.output and f"wrote {out_json}" in result.output
    data = json.loads(out_json.read_text())
    assert [(r["backend"], r["batch_size"]) for r in data["results"]] == [("ort-cpu", 1), ("ort-cpu", 4)]
    assert out_png.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.png"]


def test_json_dash_goes_to_stdout(models: dict[str, Path]) -> None:
    result = runner.invoke(app, ["bench", str(models["static"]), *FAST, "--json", "-"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["results"][0]["batch_size"] == 1 and data["results"][0]["iterations"] == 5


def test_torch_baseline_from_model_ref(models: dict[str, Path]) -> None:
    ref = f"{models['factory']}:factory"
    result = runner.invoke(
        app, ["bench", str(models["dynamic"]), "--model", ref, "--threads", "1", *FAST, "--json", "-"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [r["backend"] for r in data["results"]] == ["torch", "ort-cpu"]  # --model adds torch by default
    assert data["model"] == ref and data["environment"]["threads"]["torch_threads"] == 1


def test_regression_against_baseline_exits_1_and_shows_what_moved(tmp_path: Path, models: dict[str, Path]) -> None:
    base = tmp_path / "base.json"
    assert runner.invoke(app, ["bench", str(models["static"]), *FAST, "--json", str(base)]).exit_code == 0
    ok = runner.invoke(
        app, ["bench", str(models["static"]), *FAST, "--baseline", str(base), "--max-regression", "900%"]
    )
    assert ok.exit_code == 0, ok.output
    assert "no regression" in ok.output
    doctored = json.loads(base.read_text())
    for row in doctored["results"]:
        row["p50_ms"] /= 100.0
        row["mad_ms"] = 0.0
    base.write_text(json.dumps(doctored))
    bad = runner.invoke(app, ["bench", str(models["static"]), *FAST, "--baseline", str(base)])
    assert bad.exit_code == 1, bad.output
    assert "regressed" in bad.output and "REGRESSION" in bad.output and "baseline p50" in bad.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--backend", "ort-gpu"], "unknown backend 'ort-gpu'"),
        (["--batch", "4"], "static batch dimension of 1"),
        (["--batch", "x"], "--batch expects comma-separated positive integers"),
        (["--warmup", "2", "--warmup-s", "1"], "either --warmup N or --warmup-s S"),
        (["--iters", "2", "--duration", "1"], "either --iters N or --duration S"),
        (["--input", "x:1x9"], "received incompatible shape: 1x9"),
        (["--max-regression", "lots", "--baseline", "nope.json"], "--max-regression expects a percentage"),
        (["--baseline", "nope.json"], "baseline file not found"),
        (["--graph-opt", "max"], "unknown graph optimization level"),
        (["--json", "/nonexistent-dir/r.json"], "output directory /nonexistent-dir does not exist"),
        (["--plot", "/"], "is a directory"),
    ],
)
def test_bad_input_exits_2(models: dict[str, Path], extra: list[str], message: str) -> None:
    result = runner.invoke(app, ["bench", str(models["static"]), *FAST, *extra])
    assert result.exit_code == 2, result.output
    assert "error:" in result.stderr and message in result.stderr


def test_non_onnx_file_exits_2(tmp_path: Path) -> None:
    fake = tmp_path / "model.onnx"
    fake.write_text("definitely not protobuf")
    result = runner.invoke(app, ["bench", str(fake)])
    assert result.exit_code == 2 and "not a readable ONNX model" in result.stderr


@pytest.mark.skipif(ort_provider_reason("CUDAExecutionProvider") is None, reason="CUDA EP works here")
def test_unavailable_backend_exits_3(models: dict[str, Path]) -> None:
    result = runner.invoke(app, ["bench", str(models["static"]), "--backend", "ort-cpu,ort-cuda", *FAST])
    assert result.exit_code == 3, result.output
    assert "backend 'ort-cuda' cannot run here" in result.stderr
