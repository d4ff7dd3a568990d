"""The gate's report object and its JSON form."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normfold.gate.cases import FAILING, CaseResult
from normfold.io import json_text, write_text


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


def report_json(report: GateReport) -> str:
    """Strict JSON (non-finite metrics as ``"inf"``/``"nan"`` strings) through normfold's one JSON writer."""
    return json_text(report.to_dict())


def write_json(report: GateReport, path: str | Path) -> Path:
    return write_text(path, report_json(report))
