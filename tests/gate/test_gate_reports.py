"""Report writers: JUnit XML as CI parsers read it, Markdown, self-contained HTML, strict JSON."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from normfold.gate.cases import CaseResult
from normfold.gate.html import html_report, write_html
from normfold.gate.junit import write_junit
from normfold.gate.markdown import markdown_summary, write_markdown
from normfold.gate.records import CaseLatency, OptimizeSummary
from normfold.gate.report import GateReport, report_json, write_json
from normfold.numerics.layer_report import LayerReport, LayerResult
from normfold.numerics.tolerances import Tolerance
from tests.gate.typed_results import metrics

TOL = Tolerance(atol=1e-5, rtol=1e-4)


def _layer(order: int, module: str, max_abs: float, passed: bool) -> LayerResult:
    return LayerResult(
        name=module,
        module=module,
        module_type="Linear",
        call=0,
        output_index=0,
        order=order,
        depth=1,
        status="pass" if passed else "fail",
        tolerance=TOL,
        metrics=dataclasses.replace(metrics(max_abs, passed), name=module),
    )


@pytest.fixture
def report() -> GateReport:
    ok = CaseResult("good[ort-cpu-fp32]", "good", "ort-cpu", "fp32", "passed", duration_s=1.5)
    ok.outputs = {"y": metrics(2e-7, True)}
    ok.tolerance = TOL
    ok.latency = CaseLatency(0.42, 0.5, 0.4, 0.6, 0.43, 0.01, iterations=30, threads=1)
    ok.optimize = OptimizeSummary("portable", 3, {"Conv": 2, "BatchNormalization": 2}, {"Conv": 2}, 0.1)
    bad = CaseResult("bad[ort-cpu-fp32]", "bad", "ort-cpu", "fp32", "passed", duration_s=2.0)
    bad.outputs = {"y": metrics(3e-2, False)}
    bad.tolerance = TOL
    bad.fail("outputs ['y'] out of tolerance; y: max_abs=0.03", "compare")
    bad.layers = LayerReport(
        "ort-cpu",
        "bad.onnx",
        TOL,
        [_layer(0, "block.fc", 1e-7, True), _layer(1, "block.norm", 3e-2, False), _layer(2, "head", 5e-2, False)],
    )
    bad.first_divergence = dataclasses.replace(
        bad.layers.first_divergence,
        onnx_node="ln_0",
        op_type="LayerNormalization",
        explanation="block.norm is the first layer out of tolerance; its inputs match eager",
    )
    bad.reason = "first divergent layer: block.norm (LayerNormalization); " + bad.reason
    crashed = CaseResult("boom[ort-cpu-fp32]", "boom", "ort-cpu", "fp32", "error", duration_s=0.5)
    crashed.reason, crashed.stage = "worker process killed by SIGSEGV <&> \x07 while running", "crash"
    skipped = CaseResult("good[ort-cuda-fp32]", "good", "ort-cuda", "fp32", "skipped")
    skipped.reason, skipped.stage = "backend 'ort-cuda' cannot run here: no NVIDIA GPU visible", "probe"
    return GateReport(
        source="normfold.toml",
        executor="process",
        jobs=2,
        started_at="2026-01-01T00:00:00+00:00",
        duration_s=4.0,
        cases=[ok, bad, crashed, skipped],
    )


def test_junit_is_what_ci_parsers_read(report: GateReport, tmp_path: Path) -> None:
    path = write_junit(report, tmp_path / "j.xml")
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    cases = suite.findall("testcase")
    assert len(cases) == 4 == int(suite.get("tests"))
    assert int(suite.get("failures")) == len(suite.findall("testcase/failure")) == 1
    assert int(suite.get("errors")) == len(suite.findall("testcase/error")) == 1
    assert int(suite.get("skipped")) == len(suite.findall("testcase/skipped")) == 1
    names = [(c.get("classname"), c.get("name")) for c in cases]
    assert names[0] == ("normfold.gate.good", "ort-cpu-fp32")
    for c in cases:
        float(c.get("time"))
    failure = cases[1].find("failure")
    assert failure.get("message").startswith("first divergent layer: block.norm")
    assert "max_abs=0.03" in failure.get("message")
    assert "output y: max_abs=0.03" in failure.text
    assert "SIGSEGV" in cases[2].find("error").get("message")
    assert "\x07" not in path.read_text()  # control characters are not valid XML 1.0
    assert cases[3].find("skipped").get("message") == "backend 'ort-cuda' cannot run here: no NVIDIA GPU visible"
    assert cases[0].find("failure") is None and cases[0].find("skipped") is None


def test_markdown_summary_lists_every_case_and_the_failures(report: GateReport, tmp_path: Path) -> None:
    text = markdown_summary(report)
    assert text.startswith("## normfold gate: ❌ FAILED")
    assert "**1 passed · 1 failed · 1 errors · 1 skipped**" in text
    table_rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table_rows) == 1 + 4
    assert "⏭️ skipped" in text and "not counted as passed" in text
    assert "| optimized: 3 rewrites, 4 → 2 nodes |" in text
    assert "- **bad[ort-cpu-fp32]** (compare): first divergent layer: block.norm" in text
    assert "  - block.norm is the first layer out of tolerance; its inputs match eager" in text
    assert write_markdown(report, tmp_path / "s.md").read_text() == text


def test_html_is_self_contained_with_the_per_layer_plot(report: GateReport, tmp_path: Path) -> None:
    text = html_report(report)
    assert "<title>normfold gate: FAILED</title>" in text
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", text)
    assert len(images) == 1  # only the case with a per-layer diff gets a plot
    assert base64.b64decode(images[0]).startswith(b"\x89PNG")
    assert "&lt;&amp;&gt;" in text  # reasons are escaped
    assert "<i>block.norm is the first layer out of tolerance; its inputs match eager</i>" in text
    assert "http" not in text.replace("http-equiv", "")  # nothing fetched from elsewhere
    assert write_html(report, tmp_path / "r.html").read_text() == text


def test_json_is_strict_and_complete(report: GateReport, tmp_path: Path) -> None:
    y = report.cases[1].outputs["y"]
    report.cases[1].outputs["y"] = dataclasses.replace(y, max_rel=float("inf"))
    data = json.loads(report_json(report))
    assert data["passed"] is False
    assert data["counts"] == {"passed": 1, "failed": 1, "error": 1, "skipped": 1}
    assert data["cases"][1]["outputs"]["y"]["max_rel"] == "inf"
    assert data["cases"][1]["first_divergence"]["module"] == "block.norm"
    assert json.loads(write_json(report, tmp_path / "r.json").read_text()) == data


def test_verdict_counts_and_all_skipped_is_not_a_pass(report: GateReport) -> None:
    assert not report.passed
    only_skips = GateReport("x", "local", 1, "t", cases=[report.cases[3]])
    assert not only_skips.passed
    assert "nothing was checked" in only_skips.verdict_line()
    only_pass = GateReport("x", "local", 1, "t", cases=[report.cases[0], report.cases[3]])
    assert only_pass.passed
    assert only_pass.verdict_line().startswith("PASSED: 1 passed, 0 failed, 0 errors, 1 skipped")
