"""Matching on real-model patterns: identities, modules never called, exporter and optimizer folds.

Each tiny module reproduces one pattern of the timm/torchvision models that used to leave 20–28 % of the
layers unmatched: the rows must say what really produced each value (an alias, a fold, "not called"),
and a real fault inside an aliased region is still caught and named at its source.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from normfold.exporter import export
from normfold.fusers import optimize
from normfold.numerics import compare
from normfold.numerics.layer_report import LayerReport, LayerResult


class DropPath(nn.Module):
    """timm's DropPath: the input itself in eval or at rate 0."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        return x * torch.rand_like(x).ge(self.p) / (1 - self.p)


class Identities(nn.Module):
    """Conv → Identity → eval Dropout → DropPath(0), in a Sequential; a head the forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Identity(), nn.Dropout(0.1), DropPath(0.0))
        self.act = nn.ReLU()
        self.unused_head = nn.Linear(8, 4)  # timm keeps heads forward never calls
        self.unused_drop = DropPath(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x))


def _rows(report: LayerReport) -> dict[str, LayerResult]:
    return {row.name: row for row in report.layers}


@pytest.fixture(scope="module")
def identities_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path, torch.Tensor]:
    torch.manual_seed(0)
    model = Identities().eval()
    x = torch.randn(1, 3, 8, 8)
    path = tmp_path_factory.mktemp("aliases") / "identities.onnx"
    export(model, (x,), path, exporter="dynamo")
    return model, path, x


def test_identities_are_aliases_and_uncalled_modules_are_apart(
    identities_onnx: tuple[nn.Module, Path, torch.Tensor],
) -> None:
    model, path, x = identities_onnx
    layers = compare(model, path, [x], per_layer=True).backends["ort-cpu"].layers
    rows = _rows(layers)
    conv = rows["body.0"]
    assert conv.status == "pass" and conv.op_type == "Conv" and conv.alias_of is None
    for name in ("body.1", "body.2", "body.3", "body"):  # Identity, eval Dropout, DropPath(0), the Sequential
        row = rows[name]
        assert row.status == "pass" and row.alias_of == "body.0", (name, row.status_text)
        assert row.onnx_value == conv.onnx_value and "same value as body.0" in row.status_text
    for name in ("unused_head", "unused_drop"):
        assert rows[name].status == "not_called" and rows[name].status_text == "not called in forward"
    assert "parameters" in rows["unused_head"].reason and "parameters" not in rows["unused_drop"].reason
    counts = layers.counts
    assert counts["unmatched"] == 0 and counts["not_called"] == 2
    assert counts["layers"] == 7 and counts["aliased"] == 4  # 5 body rows, act, root; uncalled apart


def test_fault_inside_an_aliased_region_is_named_at_its_source(
    identities_onnx: tuple[nn.Module, Path, torch.Tensor], tmp_path: Path
) -> None:
    model, path, x = identities_onnx
    proto = onnx.load(str(path))
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    weight = next(t for t in proto.graph.initializer if t.name == conv.input[1])
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(1.01), weight.name))
    faulty = tmp_path / "faulty.onnx"
    onnx.save(proto, str(faulty))
    layers = compare(model, faulty, [x], per_layer=True).backends["ort-cpu"].layers
    first = layers.first_divergence
    assert first is not None and first.name == "body.0" and first.op_type == "Conv"
    rows = _rows(layers)
    assert rows["body.1"].status == rows["body"].status == "fail"  # the aliases see it too, named as aliases
    assert rows["body.1"].status_text == "FAIL (same value as body.0)"


class LayerScaleBlock(nn.Module):
    """timm's ConvNeXt (``x.mul(gamma)`` in the block) and MetaFormer (a ``Scale`` module) layer scales
    after an Mlp whose last conv the optimizer folds the multiply into."""

    def __init__(self, c: int = 8, functional: bool = True, norm: bool = False) -> None:
        super().__init__()
        last = nn.BatchNorm2d(c) if norm else nn.Identity()  # efficientformer's ConvMlpWithNorm: fc2 → norm2
        self.mlp = nn.Sequential(nn.Conv2d(c, 2 * c, 1), nn.GELU(), nn.Conv2d(2 * c, c, 1), last, nn.Dropout(0.0))
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.functional = functional
        self.scale = Scale(c)
        self.drop_path = DropPath(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(x)
        y = y.mul(self.gamma.reshape(1, -1, 1, 1)) if self.functional else self.scale(y)
        return x + self.drop_path(y)


class Scale(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(1, -1, 1, 1)


@pytest.mark.parametrize(
    ("functional", "norm"), [(True, False), (False, False), (False, True)], ids=["mul", "scale", "bn-scale"]
)
def test_layer_scale_folded_into_a_conv_is_fused_with_the_node_named(
    tmp_path: Path, functional: bool, norm: bool
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), LayerScaleBlock(functional=functional, norm=norm)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 6, 6)
    raw = export(model, (x,), tmp_path / "ls.onnx", exporter="dynamo").path
    optimize(raw, tmp_path / "ls.opt.onnx")
    layers = compare(model, tmp_path / "ls.opt.onnx", [x], per_layer=True).backends["ort-cpu"].layers
    rows = _rows(layers)
    fc2 = rows["1.mlp.2"]
    owner = "1" if functional else "1.scale"
    assert fc2.status == "fused" and fc2.fused_into == owner and "Conv" in fc2.reason, fc2.status_text
    convs = {n.name for n in onnx.load(str(tmp_path / "ls.opt.onnx")).graph.node if n.op_type == "Conv"}
    assert any(name in fc2.reason for name in convs)  # names the very node it was folded into
    source = "1.mlp.3" if norm else "1.mlp.2"
    if norm:  # the BN after fc2 went into the same Conv, along with its input
        bn = rows["1.mlp.3"]
        assert bn.status == "fused" and bn.fused_into == owner and "with its input 1.mlp.2" in bn.reason
    for name in ("1.mlp.4", "1.mlp"):  # the same value as the last computing child: fused with it
        assert rows[name].status == "fused" and rows[name].alias_of == source, (name, rows[name].status_text)
    after = rows["1.drop_path"]  # the same value as the (folded) scale: compared at the folded Conv
    assert after.status == "pass" and after.op_type == "Conv" and after.alias_of is not None
    assert after.alias_of == "1.scale" if not functional else "Tensor.mul" in after.alias_of
    if not functional:
        assert rows["1.scale"].status == "pass" and rows["1.scale"].op_type == "Conv"  # the fold is compared
    assert layers.counts["unmatched"] == 0 and layers.passed


def test_torchscript_conv_bn_fold_is_matched_by_structure(tmp_path: Path) -> None:
    """A BN at the end of a block, default-initialised (within tolerance of the identity): the conv must
    not be compared at the folded value just because it passes there."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
    model = nn.Sequential(block, nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    path = export(model, (x,), tmp_path / "ts.onnx", exporter="torchscript", opset=17).path
    layers = compare(model, path, [x], per_layer=True).backends["ort-cpu"].layers
    rows = _rows(layers)
    assert rows["0.1"].status == "pass" and rows["0.1"].op_type == "Conv" and "folded" in rows["0.1"].reason
    assert rows["0.0"].status == "fused" and rows["0.0"].fused_into == "0.1"
    assert rows["0"].alias_of == "0.1" and rows["0"].onnx_value == rows["0.1"].onnx_value
    assert layers.counts["unmatched"] == 0 and layers.passed


class InPlaceResidual(nn.Module):
    """torchvision's CNBlock: ``r = gamma * block(x); r = stochastic_depth(r); r += x`` — the identity
    returns a tensor that an in-place add changes after it returned, so tensor ids alone would make the
    identity an alias of the sum."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.block = nn.Conv2d(c, c, 3, padding=1)
        self.gamma = nn.Parameter(torch.full((c, 1, 1), 0.5))
        self.stochastic_depth = DropPath(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.gamma * self.block(x)
        result = self.stochastic_depth(result)
        result += x
        return result


def test_identity_before_an_in_place_add_is_the_value_it_returned(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = InPlaceResidual().eval(), torch.randn(1, 8, 8, 8)
    path = tmp_path / "inplace.onnx"
    export(model, (x,), path, exporter="dynamo")
    report = compare(model, path, [x], per_layer=True)
    layers = report.backends["ort-cpu"].layers
    row = _rows(layers)["stochastic_depth"]
    assert report.passed and layers.first_divergence is None, row.status_text
    assert row.status == "pass" and row.alias_of is not None and "mul" in row.alias_of.lower(), row.reason
