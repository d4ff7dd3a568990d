"""``normfold gate`` and ``normfold demo`` through typer's CliRunner."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

from normfold.cli import app
from normfold.exporter import export
from normfold.models import ZOO
from normfold.models.loader import load_model

GATE_MODELS = Path(__file__).parents[1] / "gate" / "gate_models.py"

CONFIG = f"""
[defaults]
exporter = "torchscript"
opset = 17

[[models]]
name = "ln"
ref = "{GATE_MODELS}:ln_net"
"""


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_gate_passes_and_writes_every_report(runner: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "normfold.toml").write_text(CONFIG)
    paths = {k: tmp_path / f"r.{k}" for k in ("xml", "md", "html", "json")}
    result = runner.invoke(
        app,
        [
            "gate",
            str(tmp_path / "normfold.toml"),
            "--executor",
            "local",
            "--junit",
            str(paths["xml"]),
            "--summary",
            str(paths["md"]),
            "--html",
            str(paths["html"]),
            "--json",
            str(paths["json"]),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "PASSED: 1 passed, 0 failed, 0 errors, 0 skipped" in result.output
    assert ET.parse(paths["xml"]).getroot().find("testsuite").get("tests") == "1"
    assert json.loads(paths["json"].read_text())["passed"] is True
    assert paths["md"].read_text().startswith("## normfold gate: ✅ PASSED")
    assert "<html" in paths["html"].read_text()
    for path in paths.values():
        assert "wrote" in result.output and str(path) in result.output


def test_gate_fails_with_exit_1_and_quiet_log_lines(runner: CliRunner, tmp_path: Path) -> None:
    artifact = tmp_path / "bad.onnx"
    export(load_model(f"{GATE_MODELS}:ln_net"), None, artifact, opset=17, exporter="torchscript")
    model = onnx.load(str(artifact))
    ln = next(n for n in model.graph.node if n.op_type == "LayerNormalization")
    next(a for a in ln.attribute if a.name == "epsilon").f = 1e-1
    onnx.save(model, str(artifact))
    (tmp_path / "normfold.toml").write_text(CONFIG + 'onnx = "bad.onnx"\n')
    result = runner.invoke(app, ["gate", str(tmp_path), "--executor", "local", "--quiet"])
    assert result.exit_code == 1, result.output
    assert "gate: 1 cases" in result.output
    assert "[1/1] ln[ort-cpu-fp32] failed" in result.output
    assert "FAILED: 0 passed, 1 failed" in result.output


def test_gate_config_error_exits_2_naming_key_and_file(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "normfold.toml"
    path.write_text(CONFIG.replace("opset = 17", "opset = 17\nfusion = true"))
    result = runner.invoke(app, ["gate", str(path)])
    assert result.exit_code == 2
    assert "error:" in result.output and "unknown key 'defaults.fusion'" in result.output and str(path) in result.output


def test_gate_require_turns_an_unavailable_backend_into_a_failure(runner: CliRunner, tmp_path: Path) -> None:
    from normfold.runtime.registry import get_backend

    if get_backend("ort-cuda").probe() is None:
        pytest.skip("ort-cuda runs here, so its absence cannot be tested")
    (tmp_path / "normfold.toml").write_text(CONFIG.replace("opset = 17", 'opset = 17\nbackends = ["ort-cuda"]'))
    skipped = runner.invoke(app, ["gate", str(tmp_path), "--executor", "local", "--json", "-"])
    assert skipped.exit_code == 1  # nothing ran: never a pass
    data = json.loads(skipped.stdout)
    assert [c["status"] for c in data["cases"]] == ["skipped"]
    required = runner.invoke(app, ["gate", str(tmp_path), "--executor", "local", "--require", "ort-cuda", "-q"])
    assert required.exit_code == 1
    assert "required backend unavailable" in required.output


def test_demo_config_covers_the_whole_zoo() -> None:
    from normfold.cli.gate import demo_config
    from normfold.gate import plan_cases

    config = demo_config()
    assert {m.ref for m in config.models} == {f"zoo:{name}" for name in ZOO}
    specs = plan_cases(config)
    assert {s.backend for s in specs} >= {"ort-cpu"}
    assert all(s.timeout_s > 0 for s in specs)


def test_demo_rejects_an_unknown_executor(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["demo", "--executor", "slurm", "--report-dir", str(tmp_path / "rep")])
    assert result.exit_code == 2
    assert "unknown executor 'slurm'" in result.output
