"""The gate's report object and its JSON form."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normfold.gate.cases import FAILING, CaseResult
from normfold.io import write_text


@dataclass
class GateReport:
    """Every case's verdict. ``passed`` needs at least one case that ran and no failed or errored case.

    Skipped cases (a backend that cannot run here) are never counted as passed: a gate whose every case
    was skipped checked nothing, and fails.
    """

    source: str
    executor: str
    jobs: int
    started_at: str
    duration_s: float = 0.0
    cases: list[CaseResult] = field(default_factory=list)
    required: list[str] = field(default_factory=list)
    baseline_path: str | None = None
    baseline_updated: bool = False
    notes: list[str] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    written: dict[str, str] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        counts = Counter(c.status for c in self.cases)
        return {s: counts.get(s, 0) for s in ("passed", "failed", "error", "skipped")}

    @property
    def passed(self) -> bool:
        ran = [c for c in self.cases if c.status != "skipped"]
        return bool(ran) and not any(c.status in FAILING for c in ran)

    @property
    def failing(self) -> list[CaseResult]:
        return [c for c in self.cases if c.failing]

    def verdict_line(self) -> str:
        c = self.counts
        word = "PASSED" if self.passed else "FAILED"
        detail = f"{c['passed']} passed, {c['failed']} failed, {c['error']} errors, {c['skipped']} skipped"
        if not self.passed and not c["failed"] and not c["error"]:
            detail += " (no case ran: nothing was checked)"
        return f"{word}: {detail} in {self.duration_s:.1f} s"

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "counts": self.counts,
            "source": self.source,
            "executor": self.executor,
            "jobs": self.jobs,
            "started_at": self.started_at,
            "duration_s": self.duration_s,
            "required": self.required,
            "baseline_path": self.baseline_path,
            "baseline_updated": self.baseline_updated,
            "notes": self.notes,
            "environment": self.environment,
            "cases": [c.to_dict() for c in self.cases],
        }


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return str(obj)


def _finite(obj: Any) -> Any:
    """JSON has no inf/NaN: write them as strings so every parser accepts the file."""
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def report_json(report: GateReport) -> str:
    return json.dumps(_finite(report.to_dict()), indent=2, default=_json_default, allow_nan=False) + "\n"


def write_json(report: GateReport, path: str | Path) -> Path:
    return write_text(path, report_json(report))
