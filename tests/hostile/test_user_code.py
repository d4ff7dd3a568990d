"""User model code that exits the process or throws a non-``Exception``: always that case's one-line error,
never a silent exit 0; the gate writes its reports and ends with a verdict line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.mark.parametrize(
    ("factory", "needle"),
    [
        ("exit0", "called sys.exit(0)"),
        ("exit1", "called sys.exit(1)"),
        ("base_exception", "GeneratorExit"),
    ],
)
def test_export_factory_escape_is_an_error(cli, work: Path, models_dir: Path, factory: str, needle: str) -> None:
    res = cli.invoke("export", f"{models_dir}/models.py:{factory}", "-o", "m.onnx")
    cli.error(res, 2, needle, factory)
    assert not (work / "m.onnx").exists()


def test_compare_forward_exit_is_an_error(cli, work: Path, models_dir: Path) -> None:
    res = cli.invoke("compare", f"{models_dir}/models.py:exit_forward", "tiny.onnx", "--input", "x:1x4")
    cli.error(res, 2, "forward", "sys.exit(0)")


def test_compare_per_layer_forward_exit_is_an_error(cli, work: Path, models_dir: Path) -> None:
    res = cli.invoke("compare", f"{models_dir}/models.py:exit_forward", "tiny.onnx", "--input", "x:1x4", "--per-layer")
    cli.error(res, 2, "sys.exit(0)")


def test_module_that_exits_on_import_is_an_error(cli, work: Path, models_dir: Path) -> None:
    res = cli.invoke("compare", f"{models_dir}/exits_on_import.py:f", "tiny.onnx", "--input", "x:1x4")
    cli.error(res, 2, "importing", "sys.exit(3)")


def test_export_forward_exit_leaves_nothing(cli, work: Path, models_dir: Path) -> None:
    res = cli.invoke(
        "export", f"{models_dir}/models.py:exit_forward", "--input", "x:1x4", "--exporter", "torchscript",
        "--opset", "17", "-o", "m.onnx",
    )  # fmt: skip
    cli.error(res, 2, "sys.exit(0)")
    assert not (work / "m.onnx").exists()  # and `work` checks $TMPDIR for the exporter's temp folder


def test_bench_torch_forward_exit_is_an_error(cli, work: Path, models_dir: Path) -> None:
    res = cli.invoke(
        "bench", "tiny.onnx", "--model", f"{models_dir}/models.py:exit_forward_with_inputs", "--iters", "2"
    )
    cli.error(res, 2, "sys.exit(0)")


def test_training_mode_export_warns_visibly(cli, work: Path, models_dir: Path) -> None:
    res = cli.invoke(
        "export", f"{models_dir}/models.py:training", "--input", "x:1x4", "--exporter", "torchscript",
        "--opset", "17", "-o", "t.onnx",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "WARNING" in res.stderr and "training mode" in res.stderr


@pytest.mark.slow
def test_dynamo_opset17_keeps_provenance(cli, work: Path, models_dir: Path) -> None:
    res = cli.invoke(
        "export", f"{models_dir}/models.py:seq", "--input", "x:1x4", "--opset", "17", "-o", "s.onnx", "--json"
    )
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)  # and nothing else on stdout
    assert payload["opset"] == 17
    assert payload["provenance_coverage"] == 1.0
    assert not [w for w in payload["warnings"] if "provenance" in w]


# ------------------------------------------------------------------------------------------------------
# the gate: every case gets a verdict, reports are written, the verdict line is printed


@pytest.mark.parametrize("factory", ["exit0", "exit1", "exit_forward", "base_exception"])
def test_gate_local_user_exit_is_a_case_error(cli, work: Path, models_dir: Path, factory: str) -> None:
    res = cli.invoke("gate", _config(work, models_dir, factory))
    _assert_gate_failed_with_reports(work, res.exit_code, res.stdout)


@pytest.mark.slow
def test_gate_subprocess_factory_exit0_never_exits_0(cli, work: Path, models_dir: Path) -> None:
    proc = cli.run(["gate", str(_config(work, models_dir, "exit0"))], work)
    _assert_gate_failed_with_reports(work, proc.returncode, proc.stdout)


def _assert_gate_failed_with_reports(work: Path, code: int, stdout: str) -> None:
    assert code == 1, stdout
    assert "FAILED: 0 passed, 0 failed, 1 errors" in stdout
    payload = json.loads((work / "out" / "report.json").read_text())
    (case,) = payload["cases"]
    assert case["status"] == "error" and ("sys.exit" in case["reason"] or "GeneratorExit" in case["reason"])
    assert "<testcase" in (work / "out" / "junit.xml").read_text()


def _config(work: Path, models_dir: Path, factory: str) -> Path:
    path = work / "normfold.toml"
    path.write_text(
        "[defaults]\noptimize = false\nper_layer = false\n"
        '[reports]\njunit = "out/junit.xml"\njson = "out/report.json"\n'
        f'[[models]]\nref = "{models_dir}/models.py:{factory}"\ninputs = ["x:1x4"]\nonnx = "{work}/tiny.onnx"\n'
    )
    return path
