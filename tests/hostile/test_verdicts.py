"""The gate never reports a pass without a verdict for every planned case, whatever the executor does."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from normfold.gate import runner
from normfold.gate.cases import CaseSpec
from normfold.gate.config import config_from_dict


def _config(models_dir: Path, work: Path) -> Any:
    model = {"ref": f"{models_dir}/models.py:tiny", "inputs": ["x:1x4"], "onnx": str(work / "tiny.onnx")}
    return config_from_dict(
        {
            "defaults": {"optimize": False, "per_layer": False},
            "reports": {"json": "out/report.json"},
            "models": [model, {**model, "name": "second"}],
        },
        base_dir=work,
    )


def test_a_case_the_executor_lost_is_an_error(work: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = runner.run_cases

    def loses_the_second(specs: Sequence[CaseSpec], **kwargs: Any) -> list[Any]:
        return real(specs[:1], **kwargs)  # a real run of the first case; the second never comes back

    monkeypatch.setattr(runner, "run_cases", loses_the_second)
    report = runner.run_gate(_config(models_dir, work))
    statuses = {c.case_id: c.status for c in report.cases}
    assert statuses == {"tiny[ort-cpu-fp32]": "passed", "second[ort-cpu-fp32]": "error"}
    assert not report.passed
    assert "no verdict" in report.cases[1].reason
    assert (work / "out" / "report.json").is_file()


def test_an_executor_crash_still_gives_every_case_a_verdict(
    work: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = runner.run_cases

    def crashes_after_one(specs: Sequence[CaseSpec], **kwargs: Any) -> list[Any]:
        real(specs[:1], **kwargs)
        raise RuntimeError("executor fell over")

    monkeypatch.setattr(runner, "run_cases", crashes_after_one)
    report = runner.run_gate(_config(models_dir, work))
    assert [c.status for c in report.cases] == ["passed", "error"]
    assert "executor fell over" in report.cases[1].reason
    assert not report.passed
    assert "FAILED" in report.verdict_line()
