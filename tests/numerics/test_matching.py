"""Matching you can rely on: each matched layer compares the value its module really produced.

A small MobileNetV3-shaped net reproduces the TorchScript false alarm of torchvision's mobilenet_v3_small:
Sequential-in-Sequential scopes (``/features/features.1/block/block.2/block.2.0/Conv``) used to resolve the
project Conv onto a *sibling* module, so ``features.1.block`` was compared at its squeeze-excitation Mul.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from normfold.exporter import export
from normfold.exporter.provenance import _resolve_legacy_scopes
from normfold.fusers import optimize
from normfold.numerics import compare


def test_torchscript_scopes_resolve_whole_and_only_descend() -> None:
    modules = {
        "features",
        "features.0",
        "features.1",
        "features.1.block",
        "features.1.block.0",
        "features.1.block.0.0",
        "features.1.block.0.2",
        "features.1.block.2",
        "features.1.block.2.0",
        "features.2",
        "layer1",
        "layer1.0",
        "layer1.0.relu",
        "layer2",
        "layer2.downsample",
        "layer2.downsample.0",
    }
    cases = {
        "/features/features.1/block/block.2/block.2.0/Conv": "features.1.block.2.0",
        "/features/features.1/block/block.0/block.0.2/Relu": "features.1.block.0.2",
        "/layer2/downsample/downsample.0/Conv": "layer2.downsample.0",
        "/layer1/layer1.0/relu_1/Relu": "layer1.0.relu",
        "/features/features.1/Add": "features.1",
        "/Relu": "",
    }
    for name, expected in cases.items():
        assert _resolve_legacy_scopes(name, modules) == expected, name


class SqueezeExcite(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(c, c // 2, 1), nn.Conv2d(c // 2, c, 1)
        self.activation, self.scale_activation = nn.ReLU(), nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


def _conv_bn(cin: int, cout: int, groups: int = 1, act: bool = True) -> nn.Sequential:
    kernel = 3 if groups > 1 else 1
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False)]
    layers.append(nn.BatchNorm2d(cout))
    if act:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, c: int, residual: bool) -> None:
        super().__init__()
        self.block = nn.Sequential(_conv_bn(c, c, groups=c), SqueezeExcite(c), _conv_bn(c, c, act=False))
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.block(x)
        if self.residual:
            result += x  # in place: the block's recorded output is not the InvertedResidual's
        return result


class TinyMobileNetV3(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(_conv_bn(3, 16), InvertedResidual(16, False), InvertedResidual(16, True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean((2, 3))


def test_torchscript_mobilenet_v3_block_is_not_compared_at_its_squeeze_excite(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyMobileNetV3().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 16, 16)
    raw = export(model, (x,), tmp_path / "m.onnx", exporter="torchscript", opset=17).path
    optimize(raw, tmp_path / "m.opt.onnx")
    report = compare(model, tmp_path / "m.opt.onnx", [x], per_layer=True)
    layers = report.backends["ort-cpu"].layers
    assert report.passed, layers.first_divergence and layers.first_divergence.explanation
    by_name = {row.name: row for row in layers.layers}
    for name in ("features.1.block", "features.1", "features.2.block.2"):
        row = by_name[name]
        assert row.op_type != "Mul", (name, row.onnx_node)  # never the squeeze-excite's value
        assert row.status in ("pass", "unmatched"), (name, row.status)
    assert by_name["features.2"].op_type == "Add"  # the in-place residual keeps its own value
