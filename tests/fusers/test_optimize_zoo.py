"""Every zoo model, with both exporters: export → optimize (verified) → compare against eager at fp32.

The dynamo half is marked slow: the dynamo exporter takes seconds per model on 2 cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from normfold.models import ZOO

CASES = [
    pytest.param(
        name, exporter, opset, id=f"{name}-{exporter}", marks=[pytest.mark.slow] if exporter == "dynamo" else []
    )
    for name in ZOO
    for exporter, opset in (("torchscript", 17), ("dynamo", 21))
]


@pytest.mark.parametrize(("name", "exporter", "opset"), CASES)
def test_zoo_model_optimizes_and_matches_eager(name: str, exporter: str, opset: int, tmp_path: Path) -> None:
    from normfold.exporter import export
    from normfold.fusers import optimize
    from normfold.models.loader import load_model
    from normfold.numerics import compare

    loaded = load_model(f"zoo:{name}")
    src, dst = tmp_path / "m.onnx", tmp_path / "m.opt.onnx"
    export(loaded, None, src, exporter=exporter, opset=opset)
    report = optimize(src, dst)
    assert report.verification is not None and report.verification.passed
    assert not report.verification.disabled, report.verification.disabled
    result = compare(loaded, dst, per_layer=True)  # layers decide at fp32: no layer may false-alarm either
    assert result.fail_on == "layers"
    assert result.passed, result.backends["ort-cpu"].reason
    if "BatchNormalization" in report.ops_before:
        # every zoo BN is inference-mode with constant statistics after a foldable layer
        assert "BatchNormalization" not in report.ops_after, report.to_dict()["rules"]
    assert sum(report.ops_after.values()) <= sum(report.ops_before.values())
