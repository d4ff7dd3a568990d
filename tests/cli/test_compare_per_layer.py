"""``normfold compare --per-layer``: the layer table, the highlighted first divergence, report files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from normfold.cli import app

runner = CliRunner()

FACTORY = """
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.eval(), torch.randn(1, 2, 6, 6)
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    """A factory reference, its exported ONNX file and a copy whose first conv weights are ×1.01."""
    root = tmp_path_factory.mktemp("cli_layers")
    (root / "tiny.py").write_text(FACTORY)
    ref = f"{root / 'tiny.py'}:build"
    clean = root / "tiny.onnx"
    res = runner.invoke(app, ["export", ref, "-o", str(clean)])
    assert res.exit_code == 0, res.output
    proto = onnx.load(str(clean))
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    for t in proto.graph.initializer:
        if t.name == conv.input[1]:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(1.01), t.name))
    faulty = root / "faulty.onnx"
    onnx.save(proto, str(faulty))
    return ref, clean, faulty


def test_faulty_model_names_first_divergence_and_writes_json(model: tuple[str, Path, Path], tmp_path: Path) -> None:
    ref, _, faulty = model
    report = tmp_path / "layers.json"
    res = runner.invoke(app, ["compare", ref, str(faulty), "--per-layer", "--report", str(report)])
    assert res.exit_code == 1, res.output
    assert "first divergence on ort-cpu: 0" in res.output
    assert "➜ 0" in res.output and "FAILED" in res.output
    doc = json.loads(report.read_text())
    assert doc["first_divergence"]["module"] == "0"
    assert doc["first_divergence"]["op_type"] == "Conv"
    assert [layer["name"] for layer in doc["layers"]] == ["0", "1", "2", "3", "<root>"]


def test_clean_model_passes_with_markdown_report(model: tuple[str, Path, Path], tmp_path: Path) -> None:
    ref, clean, _ = model
    report = tmp_path / "summary.md"
    res = runner.invoke(app, ["compare", ref, str(clean), "--per-layer", "--report", str(report)])
    assert res.exit_code == 0, res.output
    assert "first divergence on ort-cpu: none" in res.output
    assert "First divergence:** none" in report.read_text()


def test_per_layer_json_on_stdout(model: tuple[str, Path, Path]) -> None:
    ref, clean, _ = model
    res = runner.invoke(app, ["compare", ref, str(clean), "--per-layer", "--json"])
    assert res.exit_code == 0, res.output
    layers = json.loads(res.stdout)["backends"]["ort-cpu"]["layers"]
    assert layers["first_divergence"] is None
    assert layers["counts"]["matched"] == 5 and layers["counts"]["failed"] == 0
