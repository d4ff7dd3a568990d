"""JUnit XML that standard CI parsers accept (Jenkins, GitLab, GitHub test reporters).

One ``<testsuite>`` inside ``<testsuites>``; one ``<testcase>`` per case with ``classname`` = the model
and ``name`` = ``backend-precision``. A failing case carries ``<failure message=...>`` whose message
starts with the first divergent layer and its metrics; a case that could not be evaluated (crash, timeout,
export error) carries ``<error>``; a skipped case carries ``<skipped message="reason"/>``. The counts on
the suite agree with its children, which is what strict parsers check.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from normfold.gate.cases import CaseResult
from normfold.gate.report import GateReport
from normfold.io import write_bytes

# XML 1.0 forbids most control characters; runtime error text can contain them.
_INVALID_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")


def _clean(text: str) -> str:
    return _INVALID_XML.sub("?", text)


def _details(case: CaseResult) -> str:
    lines = [f"case: {case.case_id}", f"status: {case.status} ({case.stage or 'verdict'})", f"reason: {case.reason}"]
    if case.tolerance is not None:
        lines.append(f"tolerance: {json.dumps(case.tolerance.to_dict())}")
    for name, m in case.outputs.items():
        lines.append(
            f"output {name}: max_abs={m.max_abs:.3g} max_rel={m.max_rel:.3g} cosine={m.cosine:.7f} "
            f"rel_l2={m.rel_l2:.3g} mismatch={m.mismatch_fraction:.2%} {'ok' if m.passed else 'FAIL'}"
        )
    if case.first_divergence is not None:
        lines.append(f"first divergence: {json.dumps(case.first_divergence.to_dict(), default=str)}")
    lines.extend(f"note: {n}" for n in case.notes)
    return "\n".join(lines)


def junit_xml(report: GateReport) -> bytes:
    """The report as JUnit XML bytes (UTF-8, with declaration)."""
    counts = report.counts
    root = ET.Element("testsuites", name="normfold gate")
    suite = ET.SubElement(
        root,
        "testsuite",
        name="normfold gate",
        tests=str(len(report.cases)),
        failures=str(counts["failed"]),
        errors=str(counts["error"]),
        skipped=str(counts["skipped"]),
        time=f"{report.duration_s:.3f}",
        timestamp=report.started_at,
    )
    props = ET.SubElement(suite, "properties")
    for key, value in (("source", report.source), ("executor", report.executor), ("jobs", str(report.jobs))):
        ET.SubElement(props, "property", name=key, value=_clean(value))
    for case in report.cases:
        tc = ET.SubElement(
            suite,
            "testcase",
            classname=f"normfold.gate.{case.model}",
            name=f"{case.backend}-{case.precision}",
            time=f"{case.duration_s:.3f}",
        )
        if case.status == "failed":
            el = ET.SubElement(tc, "failure", message=_clean(case.reason), type=f"normfold.{case.stage or 'gate'}")
            el.text = _clean(_details(case))
        elif case.status == "error":
            el = ET.SubElement(tc, "error", message=_clean(case.reason), type=f"normfold.{case.stage or 'gate'}")
            el.text = _clean(_details(case))
        elif case.status == "skipped":
            ET.SubElement(tc, "skipped", message=_clean(case.reason or "skipped"))
        if case.status == "passed" and (case.outputs or case.notes):
            out = ET.SubElement(tc, "system-out")
            out.text = _clean(_details(case))
    root.set("tests", str(len(report.cases)))
    root.set("failures", str(counts["failed"]))
    root.set("errors", str(counts["error"]))
    root.set("skipped", str(counts["skipped"]))
    root.set("time", f"{report.duration_s:.3f}")
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def write_junit(report: GateReport, path: str | Path) -> Path:
    return write_bytes(path, junit_xml(report))
