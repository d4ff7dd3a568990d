"""``normfold optimize`` through typer's CliRunner: tables, --json, --report, --passes, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from normfold.cli import app

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def conv_bn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ConvTranspose+BN: the TorchScript exporter leaves it unfolded (via normfold's own exporter)."""
    from normfold.exporter import export

    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2), nn.BatchNorm2d(6)).eval()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].running_mean.uniform_(-1.0, 1.0)
    path = tmp_path_factory.mktemp("cli") / "m.onnx"
    export(model, (torch.randn(1, 4, 5, 5),), path, exporter="torchscript", opset=17)
    return path


def test_optimize_writes_model_report_and_table(conv_bn: Path, tmp_path: Path) -> None:
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    res = invoke("optimize", conv_bn, "-o", out, "--report", rep)
    assert res.exit_code == 0, res.output
    assert "fuse_bn_into_conv" in res.stdout and "verified" in res.stdout and "BatchNormalization" in res.stdout
    report = json.loads(rep.read_text())
    assert report["ops_after"] == {"ConvTranspose": 1}
    assert report["rules"]["fuse_bn_into_conv"]["applied"] == 1 and out.exists()


def test_optimize_json_passes_and_no_verify(conv_bn: Path, tmp_path: Path) -> None:
    res = invoke("optimize", conv_bn, "-o", tmp_path / "o.onnx", "--passes", "standalone_bn", "--no-verify", "--json")
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert payload["passes"] == ["standalone_bn"] and payload["verification"] is None
    assert payload["ops_after"] == payload["ops_before"]


def test_optimize_bad_input_exits_2_with_one_line(conv_bn: Path, tmp_path: Path) -> None:
    res = invoke("optimize", conv_bn, "-o", tmp_path / "o.onnx", "--passes", "nope")
    assert res.exit_code == 2 and "unknown pass name(s) ['nope']" in res.output
    res = invoke("optimize", tmp_path / "missing.onnx", "-o", tmp_path / "o.onnx")
    assert res.exit_code == 2 and "not found" in res.output
    assert not (tmp_path / "o.onnx").exists()
