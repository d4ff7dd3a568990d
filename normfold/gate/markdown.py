"""A Markdown summary sized for a CI step summary (``$GITHUB_STEP_SUMMARY``)."""

from __future__ import annotations

from pathlib import Path

from normfold._format import num
from normfold.gate.cases import CaseResult, describe_divergence
from normfold.gate.report import GateReport
from normfold.io import write_text

_ICONS = {"passed": "✅ pass", "failed": "❌ FAIL", "error": "💥 ERROR", "skipped": "⏭️ skipped"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _row(case: CaseResult) -> str:
    p50 = case.latency.p50_ms if case.latency else None
    opt = case.optimize_summary()
    reason = case.reason if case.status != "passed" else "; ".join([opt] * bool(opt) + case.notes)
    nonfinite = case.nonfinite_summary()
    if nonfinite:
        reason = f"{nonfinite}; {reason}" if reason else nonfinite
    cells = [
        case.model,
        case.backend,
        case.precision,
        _ICONS.get(case.status, case.status),
        num(case.max_abs),
        num(case.max_rel),
        num(case.min_cosine, ".7f"),
        num(p50, ".3f"),
        f"{case.duration_s:.1f}",
        reason,
    ]
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def markdown_summary(report: GateReport) -> str:
    c = report.counts
    lines = [
        f"## normfold gate: {'✅ PASSED' if report.passed else '❌ FAILED'}",
        "",
        f"**{c['passed']} passed · {c['failed']} failed · {c['error']} errors · {c['skipped']} skipped** "
        f"({len(report.cases)} cases, {report.duration_s:.1f} s, executor `{report.executor}`, jobs {report.jobs}, "
        f"config `{report.source}`)",
        "",
    ]
    if c["skipped"]:
        lines += ["Skipped cases did not run here and are not counted as passed.", ""]
    lines += [
        "| model | backend | precision | verdict | max abs | max rel | min cosine | p50 ms | time s | reason / notes |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    lines += [_row(case) for case in report.cases]
    failing = report.failing
    if failing:
        lines += ["", "### Failures", ""]
        for case in failing:
            where = describe_divergence(case.first_divergence)
            lines.append(f"- **{case.case_id}** ({case.stage or 'verdict'}): {_cell(case.reason)}")
            if where and where not in case.reason:
                lines.append(f"  - {where}")
            if case.first_divergence is not None and case.first_divergence.explanation:
                lines.append(f"  - {_cell(case.first_divergence.explanation)}")
            if case.tolerance is not None:
                lines.append(f"  - tolerance: atol={case.tolerance.atol}, rtol={case.tolerance.rtol}")
    if report.notes:
        lines += ["", "### Notes", ""] + [f"- {_cell(n)}" for n in report.notes]
    return "\n".join(lines) + "\n"


def write_markdown(report: GateReport, path: str | Path) -> Path:
    return write_text(path, markdown_summary(report))
