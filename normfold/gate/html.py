"""A single self-contained HTML report: the verdict table plus per-layer error plots (base64 PNG).

Per-layer plots are drawn for every case that carries a per-layer diff (failing cases, by default): the
max-abs error of each layer in execution order on a log scale, failing layers in red, so the point where
the numbers leave the tolerance band is visible at a glance.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path

from normfold._format import num
from normfold.gate.cases import CaseResult, describe_divergence
from normfold.gate.report import GateReport
from normfold.io import write_text
from normfold.numerics.layer_report import LayerResult
from normfold.numerics.reports import labelled_layers

log = logging.getLogger(__name__)

_COLORS = {"passed": "#1a7f37", "failed": "#cf222e", "error": "#8250df", "skipped": "#9a6700"}

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em;color:#1f2328}
table{border-collapse:collapse;font-size:14px}th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left}
th{background:#f6f8fa}td.num{text-align:right;font-family:ui-monospace,monospace}
.badge{color:#fff;border-radius:4px;padding:1px 6px;font-weight:600}
section{margin-top:2em}img{max-width:100%;border:1px solid #d0d7de}code{background:#f6f8fa;padding:0 3px}
"""


def _layer_rows(case: CaseResult) -> list[LayerResult]:
    return [] if case.layers is None else list(case.layers.layers)


def _layer_label(row: LayerResult, index: int) -> str:
    return row.name or row.module or row.onnx_node or f"layer {index}"


def _layer_atol(row: LayerResult) -> float | None:
    """The absolute tolerance this layer was judged with (per-layer tolerances may grow with depth)."""
    for source in (row.metrics, row.tolerance):
        if source is not None:
            return float(source.atol)
    return None


def layer_plot_png(case: CaseResult) -> bytes | None:
    """PNG of per-layer max-abs error for ``case``, or None when it has no per-layer numbers."""
    rows = [r for r in _layer_rows(case) if r.max_abs is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [max(float(r.max_abs or 0.0), 1e-12) for r in rows]
    colors = ["#cf222e" if r.status == "fail" else "#0969da" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, min(0.35 * len(rows), 18.0)), 3.6))
    try:
        ax.bar(range(len(values)), values, color=colors)
        ax.set_yscale("log")
        ax.set_ylabel("max |onnx − eager|")
        ax.set_title(f"{case.case_id}: per-layer error (red: out of tolerance)")
        layer_tols = [_layer_atol(r) for r in rows]
        if all(t is not None for t in layer_tols):
            tols = [float(t or 0.0) for t in layer_tols]
            ax.plot(range(len(rows)), tols, "_", color="#1f2328", markersize=18, label="layer tolerance")
            ax.legend(loc="upper left")
        elif case.tolerance is not None and case.tolerance.atol:
            ax.axhline(case.tolerance.atol, color="#9a6700", linestyle="--", linewidth=1, label="atol")
            ax.legend(loc="upper left")
        first = case.first_divergence.name if case.first_divergence is not None else None
        first_index = next((i for i, r in enumerate(rows) if first and r.name == first), None)
        ratios = [v / t if t else v for v, t in zip(values, layer_tols, strict=True)]
        shown = labelled_layers(ratios, first_index)
        ax.set_xticks(shown)
        ax.set_xticklabels([_layer_label(rows[i], i) for i in shown], rotation=60, ha="right", fontsize=7)
        ax.set_xlabel(f"{len(rows)} compared layers in execution order (labelled: first divergence, worst)")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
    finally:
        plt.close(fig)
    return buf.getvalue()


def _case_section(case: CaseResult) -> str:
    e = html.escape
    parts = [f"<section id='{e(case.case_id)}'><h3>{e(case.case_id)}</h3>"]
    parts.append(f"<p><b>{e(case.status)}</b> ({e(case.stage or 'verdict')}): {e(case.reason)}</p>")
    where = describe_divergence(case.first_divergence)
    if where:
        parts.append(f"<p>{e(where)}</p>")
    if case.first_divergence is not None and case.first_divergence.explanation:
        parts.append(f"<p><i>{e(case.first_divergence.explanation)}</i></p>")
    if case.outputs:
        parts.append(
            "<table><tr><th>output</th><th>max abs</th><th>max rel</th><th>cosine</th><th>rel L2</th>"
            "<th>mismatch</th><th>non-finite (ref)</th><th>verdict</th></tr>"
        )
        for name, m in case.outputs.items():
            parts.append(
                f"<tr><td>{e(name)}</td><td class=num>{num(m.max_abs)}</td><td class=num>{num(m.max_rel)}</td>"
                f"<td class=num>{m.cosine:.7f}</td><td class=num>{num(m.rel_l2)}</td>"
                f"<td class=num>{m.mismatch_fraction:.2%}</td>"
                f"<td class=num>{m.nonfinite} ({m.expected_nonfinite})</td>"
                f"<td>{'ok' if m.passed else e('FAIL ' + m.reason)}</td></tr>"
            )
        parts.append("</table>")
    # Plots where they explain something (a failure or a masked divergence); every case keeps its table.
    png = layer_plot_png(case) if (case.failing or case.first_divergence) else None
    if png is not None:
        data = base64.b64encode(png).decode("ascii")
        parts.append(f"<p><img alt='per-layer error of {e(case.case_id)}' src='data:image/png;base64,{data}'></p>")
    rows = _layer_rows(case)
    if rows:
        parts.append(
            "<details><summary>per-layer table</summary><table><tr><th>#</th><th>layer</th><th>max abs</th>"
            "<th>max rel</th><th>verdict</th></tr>"
        )
        for i, r in enumerate(rows):
            verdict = "FAIL" if r.status == "fail" else e(r.status)
            parts.append(
                f"<tr><td>{i}</td><td>{e(_layer_label(r, i))}</td><td class=num>{num(r.max_abs)}</td>"
                f"<td class=num>{num(r.max_rel)}</td><td>{verdict}</td></tr>"
            )
        parts.append("</table></details>")
    for note in [case.optimize_summary(), *case.notes]:
        if note:
            parts.append(f"<p><i>note:</i> {e(note)}</p>")
    parts.append("</section>")
    return "\n".join(parts)


def html_report(report: GateReport) -> str:
    e = html.escape
    c = report.counts
    verdict = "PASSED" if report.passed else "FAILED"
    rows = []
    for case in report.cases:
        color = _COLORS.get(case.status, "#57606a")
        p50 = case.latency.p50_ms if case.latency else None
        rows.append(
            f"<tr><td><a href='#{e(case.case_id)}'>{e(case.model)}</a></td><td>{e(case.backend)}</td>"
            f"<td>{e(case.precision)}</td><td><span class=badge style='background:{color}'>{e(case.status)}</span></td>"
            f"<td class=num>{num(case.max_abs)}</td><td class=num>{num(case.max_rel)}</td>"
            f"<td class=num>{num(p50, '.3f')}</td><td class=num>{case.duration_s:.1f}</td>"
            f"<td>{e(case.reason)}</td></tr>"
        )
    details = [_case_section(case) for case in report.cases if case.status != "skipped"]
    color = _COLORS["passed"] if report.passed else _COLORS["failed"]
    counts = (
        f"{c['passed']} passed · {c['failed']} failed · {c['error']} errors · {c['skipped']} skipped "
        "(skipped cases are not counted as passed)"
    )
    run = (
        f"{len(report.cases)} cases in {report.duration_s:.1f} s · executor <code>{e(report.executor)}</code>, "
        f"jobs {report.jobs} · config <code>{e(report.source)}</code> · started {e(report.started_at)}"
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>normfold gate: {verdict}</title><style>{_CSS}</style></head>
<body>
<h1>normfold gate: <span style="color:{color}">{verdict}</span></h1>
<p>{counts} · {run}</p>
<table><tr><th>model</th><th>backend</th><th>precision</th><th>verdict</th><th>max abs</th><th>max rel</th>
<th>p50 ms</th><th>time s</th><th>reason</th></tr>
{chr(10).join(rows)}
</table>
{chr(10).join(details)}
</body></html>
"""


def write_html(report: GateReport, path: str | Path) -> Path:
    return write_text(path, html_report(report))
