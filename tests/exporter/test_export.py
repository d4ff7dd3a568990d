"""Exporter: opset contract, eval mode, dynamic batch, provenance for both exporters, atomic writes."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from normfold.errors import ExportError, UsageError
from normfold.exporter import export, module_path
from normfold.numerics import compare


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.ln = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(torch.relu(self.bn(self.conv(x))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(Block())
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer1(x))


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("exporter", "opset"), [("dynamo", 21), ("dynamo", 18), ("torchscript", 17)])
def test_export_has_requested_opset_matches_eager_and_names_modules(
    net: Net, tmp_path: Path, exporter: str, opset: int
) -> None:
    """One export per exporter/opset checks the opset contract, the numerics and the provenance stamps."""
    res = export(net, (X,), tmp_path / "m.onnx", opset=opset, exporter=exporter)
    model = onnx.load(str(res.path))
    assert res.opset == opset
    assert {i.domain: i.version for i in model.opset_import}.get("") == opset
    assert res.input_names == ["x"]
    assert compare(net, res.path, [X]).passed
    paths = {module_path(n) for n in model.graph.node}
    modules = {name for name, _ in net.named_modules()}
    # Every recorded path is a real module of the net, and the key layers are all traced.
    assert paths - {None} <= modules
    assert {"layer1.0.conv", "layer1.0.ln", "fc"} <= paths
    by_op = {n.op_type: module_path(n) for n in model.graph.node}
    assert by_op["LayerNormalization"] == "layer1.0.ln"
    assert by_op["Conv"] == "layer1.0.conv"


def test_training_mode_model_is_exported_in_eval_with_a_warning(net: Net, tmp_path: Path) -> None:
    net.train()
    res = export(net, (X,), tmp_path / "m.onnx")
    assert not net.training
    assert any("training mode" in w for w in res.warnings)
    assert compare(net, res.path, [X]).passed


def test_dynamic_batch_makes_dim0_symbolic(net: Net, tmp_path: Path) -> None:
    res = export(net, (X,), tmp_path / "m.onnx", dynamic_batch=True)
    dim0 = onnx.load(str(res.path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.HasField("dim_value")
    big = torch.randn(5, 3, 8, 8)
    assert compare(net, res.path, [big]).passed


def test_torchscript_refuses_opset_above_20(net: Net, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="opset ≤ 20"):
        export(net, (X,), tmp_path / "m.onnx", exporter="torchscript", opset=21)
    assert not list(tmp_path.iterdir())


def test_unknown_exporter_and_norm_mode_are_usage_errors(net: Net, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown exporter"):
        export(net, (X,), tmp_path / "m.onnx", exporter="fx")
    with pytest.raises(UsageError, match="norm export"):
        export(net, (X,), tmp_path / "m.onnx", norm_export="weird")


def test_failed_export_leaves_no_file_and_keeps_an_existing_one(tmp_path: Path) -> None:
    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom inside forward")

    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous good model")
    with pytest.raises(ExportError, match="boom inside forward"):
        export(Broken(), (X,), target)
    assert target.read_bytes() == b"previous good model"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
