"""``--norm-export decomposed``: no normalization op left, same numbers, provenance kept."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from normfold.exporter import export, module_path
from normfold.models.loader import load_model
from normfold.numerics import compare

NORM_OPS = {"LayerNormalization", "GroupNormalization", "InstanceNormalization", "BatchNormalization"}


@pytest.mark.parametrize(
    ("ref", "exporter", "opset", "norm_module"),
    [
        ("zoo:transformer_block", "dynamo", 21, "ln1"),
        ("zoo:unet_resblock", "dynamo", 21, "norm1"),
        ("zoo:instancenorm_style", "torchscript", 17, None),
    ],
)
def test_decomposed_export_has_no_norm_ops_and_matches_eager(
    tmp_path: Path, ref: str, exporter: str, opset: int, norm_module: str | None
) -> None:
    loaded = load_model(ref)
    res = export(loaded, None, tmp_path / "m.onnx", norm_export="decomposed", exporter=exporter, opset=opset)
    model = onnx.load(str(res.path))
    ops = {n.op_type for n in model.graph.node}
    assert not ops & NORM_OPS
    assert "ReduceMean" in ops and "Sqrt" in ops
    assert {i.domain for i in model.opset_import} == {""}
    assert compare(loaded, res.path).passed
    if norm_module is not None:
        owners = {module_path(n) for n in model.graph.node if n.op_type == "ReduceMean"}
        assert any(o is not None and o.endswith(norm_module) for o in owners), owners
