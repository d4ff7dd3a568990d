"""Compare reports on disk: stable JSON, CI Markdown, self-contained HTML; written atomically."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from normfold.errors import UsageError
from normfold.exporter import export
from normfold.numerics import CompareReport, compare
from normfold.numerics.reports import REPORT_SCHEMA, plot_layer_errors, write_compare_report


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> tuple[CompareReport, CompareReport]:
    """A clean and a faulty (last conv's weights ×1.01) per-layer comparison of one tiny model."""
    root = tmp_path_factory.mktemp("reports")
    module, x = _tiny(), torch.randn(1, 2, 6, 6)
    clean = root / "tiny.onnx"
    export(module, (x,), clean)
    model = onnx.load(str(clean))
    conv = [n for n in model.graph.node if n.op_type == "Conv"][-1]
    for t in model.graph.initializer:
        if t.name == conv.input[1]:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(1.01), t.name))
    faulty = root / "faulty.onnx"
    onnx.save(model, str(faulty))
    ok = compare(module, clean, (x,), per_layer=True, model_name="tiny")
    bad = compare(module, faulty, (x,), per_layer=True, model_name="tiny")
    return ok, bad


def _strict(text: str) -> dict:
    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_json_is_stable_and_names_the_first_divergence(
    reports: tuple[CompareReport, CompareReport], tmp_path: Path
) -> None:
    ok, bad = reports
    doc = _strict(write_compare_report(bad, tmp_path / "r.json").read_text())
    assert doc["schema"] == REPORT_SCHEMA and doc["passed"] is False
    first = doc["first_divergence"]
    assert first["module"] == "3" and first["op_type"] == "Conv" and first["backend"] == "ort-cpu"
    assert {"module", "onnx_node", "op_type", "max_abs", "max_rel", "explanation"} <= set(first)
    assert first["max_abs"] > first["atol"]
    names = [layer["name"] for layer in doc["layers"]]
    assert names == ["0", "1", "2", "3", "<root>"]
    assert {layer["backend"] for layer in doc["layers"]} == {"ort-cpu"}
    assert [layer["status"] for layer in doc["layers"]][:3] == ["pass", "pass", "pass"]
    clean = _strict(write_compare_report(ok, tmp_path / "ok.json").read_text())
    assert clean["passed"] is True and clean["first_divergence"] is None
    assert sorted(clean) == sorted(doc)  # same keys whether or not it failed


def test_markdown_fits_a_step_summary(reports: tuple[CompareReport, CompareReport], tmp_path: Path) -> None:
    _, bad = reports
    text = write_compare_report(bad, tmp_path / "summary.md").read_text()
    assert text.startswith("## normfold compare: `tiny` vs eager — ❌ FAILED")
    assert "> **First divergence: `3`**" in text
    assert "| **➜ `3`** |" in text
    assert "<details>" in text and "</details>" in text
    assert "(3 pass, 2 fail)" in text


def test_html_is_self_contained_with_the_depth_plot(
    reports: tuple[CompareReport, CompareReport], tmp_path: Path
) -> None:
    _, bad = reports
    text = write_compare_report(bad, tmp_path / "report.html").read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert 'src="data:image/png;base64,' in text
    assert "http://" not in text and "https://" not in text and "<script" not in text
    png = text.split('src="data:image/png;base64,', 1)[1].split('"', 1)[0]
    assert base64.b64decode(png).startswith(b"\x89PNG")
    assert 'class="fail first"' in text
    assert list(tmp_path.iterdir()) == [tmp_path / "report.html"]  # no temp file left behind


def test_plot_is_a_png(reports: tuple[CompareReport, CompareReport]) -> None:
    _, bad = reports
    assert plot_layer_errors(bad.backends["ort-cpu"].layers).startswith(b"\x89PNG")


def test_unknown_suffix_is_a_usage_error(reports: tuple[CompareReport, CompareReport], tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"\.json, \.md or \.html"):
        write_compare_report(reports[0], tmp_path / "report.txt")
    assert not list(tmp_path.iterdir())
