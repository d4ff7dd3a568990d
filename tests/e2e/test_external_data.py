"""A model saved with external data goes through every command: export, optimize, run, compare
--per-layer, bench, convert, triton and gate.

The model is tiny; external data is forced by lowering the inline limit for the export only. Every later
command must keep the weights external because its input had them (and never copy them into the folder
of a scratch file, or leave one behind).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from normfold import onnx_files
from normfold.cli import app
from normfold.numerics import layers
from normfold.runtime.onnxruntime import create_session

runner = CliRunner()

FACTORY = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 6 * 6, 32), nn.LayerNorm(32),
    )
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.eval(), (torch.randn(1, 3, 6, 6),)
"""


def _external(path: Path) -> set[str]:
    """The locations of the model's external tensors (read without the data)."""
    model = onnx.load(str(path), load_external_data=False)
    return {
        e.value
        for t in onnx_files.model_tensors(model)
        if t.data_location == onnx.TensorProto.EXTERNAL
        for e in t.external_data
        if e.key == "location"
    }


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, f"{args}: {result.output}"
    return result.output


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("extdata")
    (folder / "net.py").write_text(FACTORY)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_files, "INLINE_LIMIT", 0)  # force external data on a 20 KB model
        _ok(["export", f"{folder / 'net.py'}:make", "-o", str(folder / "m.onnx")])
    return folder


def test_export_writes_data_beside_the_model(work: Path) -> None:
    assert _external(work / "m.onnx") == {"m.onnx.data"}
    assert (work / "m.onnx.data").stat().st_size > 5000


def test_optimize_keeps_external_data_and_folds(work: Path) -> None:
    out = _ok(["optimize", str(work / "m.onnx"), "-o", str(work / "m.opt.onnx"), "--json"])
    report = json.loads(out)
    assert report["verification"]["passed"] is True
    assert "BatchNormalization" not in report["ops_after"]
    assert _external(work / "m.opt.onnx") == {"m.opt.onnx.data"}
    assert (work / "m.onnx.data").is_file()  # the input's data is untouched


def test_run_compare_bench_convert_triton_gate(work: Path, tmp_path: Path) -> None:
    model = work / "m.onnx"
    _ok(["run", str(model), "-o", str(tmp_path / "out.npz")])
    assert np.load(tmp_path / "out.npz")

    before = set(work.iterdir())
    out = _ok(["compare", f"{work / 'net.py'}:make", str(model), "--per-layer", "--json"])
    assert json.loads(out)["passed"] is True
    assert set(work.iterdir()) == before  # the per-layer scratch copy is gone

    _ok(["bench", str(model), "--iters", "3", "--warmup", "1"])

    _ok(["convert", str(model), "-o", str(tmp_path / "m.fp16.onnx"), "--precision", "fp16"])
    assert _external(tmp_path / "m.fp16.onnx") == {"m.fp16.onnx.data"}

    _ok(["triton", str(model), "--repo", str(tmp_path / "repo"), "--name", "m"])
    version = tmp_path / "repo" / "m" / "1"
    assert (version / "m.onnx.data").read_bytes() == (work / "m.onnx.data").read_bytes()
    assert create_session(version / "model.onnx", ["CPUExecutionProvider"]).get_inputs()

    config = tmp_path / "normfold.toml"
    config.write_text(f'[[models]]\nname = "ext"\nref = "{work / "net.py"}:make"\nonnx = "{model}"\n')
    _ok(["gate", str(config), "--executor", "local"])


def test_per_layer_chunks_give_the_same_answer(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["compare", f"{work / 'net.py'}:make", str(work / "m.opt.onnx"), "--per-layer", "--json"]
    whole = json.loads(_ok(args))
    runs: list[int] = []
    real = layers._run_copy

    def counted(*a: object, **k: object) -> dict[str, np.ndarray]:
        runs.append(1)
        return real(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(layers, "_output_budget", lambda: 1)  # one extra output per run
    monkeypatch.setattr(layers, "_run_copy", counted)
    chunked = json.loads(_ok(args))
    layers_whole, layers_chunked = (r["backends"]["ort-cpu"]["layers"] for r in (whole, chunked))
    assert len(runs) == layers_whole["extra_outputs"] > 1  # one run per extra output
    assert layers_chunked == layers_whole
