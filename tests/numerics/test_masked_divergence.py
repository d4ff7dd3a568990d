"""A diverging layer that a ReLU masks fails by default at fp32 (layers decide) and is named; with
``fail_on="outputs"`` the output verdict stands and the layer is still named in the reason."""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from onnx import numpy_helper
from torch import nn

from normfold.exporter import export
from normfold.numerics import compare


class ConvRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.relu = nn.ReLU()
        with torch.no_grad():
            self.conv.bias.copy_(torch.tensor([0.0, -100.0]))  # channel 1 is always negative → ReLU zeroes it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x))


def test_masked_fault_is_reported_without_failing_the_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ConvRelu().eval()
    x = torch.randn(1, 1, 8, 8)
    res = export(model, (x,), tmp_path / "m.onnx")
    proto = onnx.load(str(res.path))
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    bias = next(i for i in proto.graph.initializer if i.name == conv.input[2])
    values = numpy_helper.to_array(bias).copy()
    values[1] -= 1.0  # a real fault, invisible after the ReLU
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    onnx.save(proto, str(res.path))

    report = compare(model, res.path, [x], per_layer=True, fail_on="outputs")
    ort = report.backends["ort-cpu"]
    assert report.passed  # the outputs really are identical
    assert all(m.passed for m in ort.outputs.values())
    assert ort.layers.first_divergence is not None
    assert ort.layers.first_divergence.module == "conv"
    assert "layer conv diverges" in ort.reason

    strict = compare(model, res.path, [x], per_layer=True)  # the default at fp32: layers decide
    ort = strict.backends["ort-cpu"]
    assert strict.fail_on == "layers" and not strict.passed and ort.status == "failed"
    assert all(m.passed for m in ort.outputs.values())  # still: the outputs alone would pass
    assert ort.reason.startswith("layer conv out of tolerance") and "masked downstream" in ort.reason
