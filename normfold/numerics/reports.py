"""Compare reports as files: stable JSON, Markdown for a CI step summary, self-contained HTML.

:func:`write_compare_report` picks the format from the suffix and writes atomically. The JSON layout is
a contract (``schema`` names its version):

* top level: ``schema``, ``passed``, ``model``, ``onnx_path``, ``precision``, ``tolerance``, ``inputs``,
  ``first_divergence`` (null, or the first failing layer of the first backend that has one:
  ``backend``, ``module``, ``name``, ``onnx_node``, ``onnx_value``, ``op_type``, ``max_abs``,
  ``max_rel``, ``mismatch_fraction``, ``atol``, ``rtol``, ``order``, ``explanation``), ``layers`` (every
  layer of every backend run per layer, each with its ``backend``) and ``backends`` (the full
  per-backend results, counts included).
* Non-finite numbers are written as the strings ``"inf"``, ``"-inf"`` and ``"nan"`` so the file is
  strict JSON.

The HTML embeds the error-along-depth plot as a base64 PNG (matplotlib's Agg canvas, no pyplot state),
so the one file can be attached to a CI run and opened anywhere.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from normfold._format import num
from normfold.errors import UsageError
from normfold.io import json_text, write_text

if TYPE_CHECKING:
    from normfold.numerics.compare import BackendComparison, CompareReport
    from normfold.numerics.layers import LayerReport, LayerResult

__all__ = [
    "REPORT_SCHEMA",
    "compare_report_dict",
    "compare_report_html",
    "compare_report_json",
    "compare_report_markdown",
    "plot_layer_errors",
    "write_compare_report",
]

REPORT_SCHEMA = "normfold.compare/1"
FORMATS = {".json": "json", ".md": "markdown", ".markdown": "markdown", ".html": "html", ".htm": "html"}


def _layer_reports(report: CompareReport) -> list[tuple[str, LayerReport]]:
    return [(name, b.layers) for name, b in report.backends.items() if b.layers is not None]


def compare_report_dict(report: CompareReport) -> dict[str, Any]:
    """The stable JSON document (see module doc) as a plain dict."""
    first: dict[str, Any] | None = None
    layers: list[dict[str, Any]] = []
    for name, lr in _layer_reports(report):
        fd = lr.first_divergence
        if fd is not None and first is None:
            first = {"backend": name, **fd.to_dict()}
        layers.extend({"backend": name, **layer.to_dict()} for layer in lr.layers)
    base = report.to_dict()
    return {
        "schema": REPORT_SCHEMA,
        "passed": report.passed,
        "model": report.model,
        "onnx_path": report.onnx_path,
        "precision": report.precision,
        "tolerance": report.tolerance.to_dict(),
        "input_source": report.input_source,
        "inputs": report.inputs,
        "per_layer": bool(_layer_reports(report)),
        "first_divergence": first,
        "layers": layers,
        "backends": base["backends"],
    }


def compare_report_json(report: CompareReport) -> str:
    return json_text(compare_report_dict(report))


# --------------------------------------------------------------------------------------------------------
# Shared formatting


def _shape(shape: tuple[int, ...] | list[int]) -> str:
    return "x".join(map(str, shape)) if shape else "–"


def _backend_line(b: BackendComparison) -> str:
    return f"{b.status}" + (f": {b.reason}" if b.reason else "")


# --------------------------------------------------------------------------------------------------------
# Markdown


def _md(text: object) -> str:
    """Escape what would break a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def compare_report_markdown(report: CompareReport) -> str:
    """GitHub-flavoured Markdown, short enough for ``$GITHUB_STEP_SUMMARY``; the layer table is folded."""
    verdict = "✅ PASSED" if report.passed else "❌ FAILED"
    lines = [
        f"## normfold compare: `{_md(report.model)}` vs eager — {verdict}",
        "",
        f"ONNX `{_md(report.onnx_path)}` · {report.precision}: {report.tolerance.describe()} · "
        f"inputs: {_md(report.input_source)}",
        "",
        "| backend | output | shape | max abs | max rel | cosine | non-finite (ref) | verdict |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, b in report.backends.items():
        if not b.outputs:
            lines.append(f"| {name} | – | – | – | – | – | – | {_md(_backend_line(b))} |")
        for out_name, m in b.outputs.items():
            v = "pass" if m.passed else f"**FAIL** {_md(m.reason)}"
            lines.append(
                f"| {name} | {_md(out_name)} | {_shape(m.shape)} | {num(m.max_abs)} | {num(m.max_rel)} | "
                f"{m.cosine:.7f} | {m.nonfinite} ({m.expected_nonfinite}) | {v} |"
            )
        if b.layers is not None and b.reason and b.outputs:
            lines.append(f"| {name} | layers | | | | | | {_md(b.reason)} |")
    for name, lr in _layer_reports(report):
        c = lr.counts
        lines += [
            "",
            f"### Per-layer on {name}: {c['matched']} matched ({c['passed']} pass, {c['failed']} fail), "
            f"{c['fused']} fused, {c['unmatched']} not matched; {c['aliased']} of the matched are aliases, "
            f"{c['not_called']} modules not called",
            "",
            f"Layer tolerance: {lr.tolerance_rule} (base {lr.tolerance.describe()}).",
            "",
        ]
        fd = lr.first_divergence
        if fd is None:
            lines.append("**First divergence:** none — every compared layer is within tolerance.")
        else:
            lines.append(f"> **First divergence: `{_md(fd.name)}`** — {_md(fd.explanation)}")
        lines += [
            "",
            f"<details><summary>All {len(lr.layers)} layers in execution order</summary>",
            "",
            "| # | module | type | op | shape | max abs | max rel | atol_eff | status |",
            "| ---: | --- | --- | --- | --- | ---: | ---: | ---: | --- |",
        ]
        first_name = fd.name if fd is not None else None
        for i, layer in enumerate(lr.layers):
            status = _md(layer.status_text)
            label = f"`{_md(layer.name)}`"
            if layer.name == first_name:
                label, status = f"**➜ {label}**", f"**{status}**"
            elif layer.status == "fail":
                status = f"**{status}**"
            lines.append(
                f"| {i} | {label} | {_md(layer.module_type)} | {_md(layer.op_type or '–')} | {_shape(layer.shape)} | "
                f"{num(layer.max_abs)} | {num(layer.max_rel)} | "
                f"{num(layer.tolerance.atol if layer.tolerance else None)} | {status} |"
            )
        lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------
# Plot and HTML


#: How many of the worst layers a plot names besides the first divergence; the table lists them all.
PLOT_LABELS = 8


def labelled_layers(ratios: list[float], first: int | None, worst: int = PLOT_LABELS) -> list[int]:
    """Indices a per-layer plot names: the first divergence and the ``worst`` largest error÷tolerance.

    A real model has hundreds of layers; one tick label each overlaps into an unreadable band. What
    a reader needs from the plot is where it went wrong and how bad the worst layers are; every other
    layer is in the table next to it.
    """
    ranked = sorted(range(len(ratios)), key=lambda i: -ratios[i] if math.isfinite(ratios[i]) else -math.inf)
    chosen = set(ranked[:worst])
    if first is not None:
        chosen.add(first)
    return sorted(chosen)


def plot_layer_errors(layers: LayerReport, title: str = "") -> bytes:
    """PNG of max-abs error and its tolerance along the compared layers (execution order, log scale)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    compared = [layer for layer in layers.layers if layer.metrics is not None and layer.tolerance is not None]
    fig = Figure(figsize=(9, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if compared:
        xs = list(range(len(compared)))
        floor = 1e-12
        errs = [max(layer.metrics.max_abs, floor) if layer.metrics is not None else floor for layer in compared]
        errs = [e if math.isfinite(e) else 1e3 for e in errs]
        tols = [layer.tolerance.atol if layer.tolerance else floor for layer in compared]
        ax.plot(xs, tols, color="#888888", linestyle="--", linewidth=1, label="atol_eff (layer tolerance)")
        ax.plot(xs, errs, color="#1f77b4", linewidth=1, alpha=0.6)
        colors = ["#2ca02c" if layer.status == "pass" else "#d62728" for layer in compared]
        ax.scatter(xs, errs, c=colors, s=18, zorder=3, label="max |onnx − eager| (green pass, red fail)")
        ax.set_yscale("log")
        fd = layers.first_divergence
        if fd is not None:
            idx = next(i for i, layer in enumerate(compared) if layer.name == fd.name)
            ax.axvline(idx, color="#d62728", linewidth=1)
            ax.annotate(
                f"first divergence: {fd.name}",
                (idx, errs[idx]),
                textcoords="offset points",
                xytext=(6, -14),
                fontsize=8,
                color="#d62728",
            )
        first_index = None if fd is None else next(i for i, layer in enumerate(compared) if layer.name == fd.name)
        shown = labelled_layers([e / t if t > 0 else math.inf for e, t in zip(errs, tols, strict=True)], first_index)
        ax.set_xticks(shown)
        ax.set_xticklabels([compared[i].name for i in shown], rotation=60, ha="right", fontsize=7)
        ax.set_xlabel(f"{len(compared)} compared layers in execution order (labelled: first divergence, worst)")
        ax.legend(fontsize=7, loc="upper left")
    else:
        ax.text(0.5, 0.5, "no layer could be compared", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("max abs error")
    ax.set_title(title or f"error along depth on {layers.backend}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:0.5em 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.pass td.s{color:#1a7f37} tr.fail td.s{color:#cf222e;font-weight:bold}
tr.fused td.s{color:#8250df} tr.unmatched td.s{color:#9a6700}
tr.first{background:#ffebe9;font-weight:bold}
.verdict-pass{color:#1a7f37} .verdict-fail{color:#cf222e}
.callout{border-left:4px solid #cf222e;background:#fff5f5;padding:0.6em 1em;margin:1em 0}
.ok{border-left:4px solid #1a7f37;background:#f0fff4;padding:0.6em 1em;margin:1em 0}
code{background:#f3f3f3;padding:0 3px}
"""


def _e(x: object) -> str:
    return html.escape(str(x))


def _layer_row(i: int, layer: LayerResult, first_name: str | None) -> str:
    classes = layer.status + (" first" if layer.name == first_name else "")
    cells = [
        f'<td class="n">{i}</td>',
        f"<td><code>{_e(layer.name)}</code></td>",
        f"<td>{_e(layer.module_type)}</td>",
        f"<td>{_e(layer.op_type or '–')}</td>",
        f"<td>{_e(layer.onnx_node or '–')}</td>",
        f"<td>{_e(_shape(layer.shape))}</td>",
        f'<td class="n">{_e(num(layer.max_abs))}</td>',
        f'<td class="n">{_e(num(layer.max_rel))}</td>',
        f'<td class="n">{_e(num(layer.metrics.cosine if layer.metrics is not None else None))}</td>',
        f'<td class="n">{_e(num(layer.tolerance.atol if layer.tolerance else None))}</td>',
        f'<td class="s">{_e(layer.status_text)}</td>',
    ]
    return f'<tr class="{classes}">{"".join(cells)}</tr>'


def compare_report_html(report: CompareReport) -> str:
    """One self-contained HTML page: outputs, per-layer tables, first divergence, embedded PNG plots."""
    verdict = (
        '<span class="verdict-pass">PASSED</span>' if report.passed else '<span class="verdict-fail">FAILED</span>'
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>normfold compare: {_e(report.model)}</title><style>{_CSS}</style></head><body>",
        f"<h1>normfold compare: <code>{_e(report.model)}</code> vs eager — {verdict}</h1>",
        f"<p>ONNX <code>{_e(report.onnx_path)}</code> · {_e(report.precision)}: {_e(report.tolerance.describe())}"
        f" · inputs: {_e(report.input_source)} {_e(report.inputs)}</p>",
        "<h2>Outputs</h2><table><tr><th>backend</th><th>output</th><th>shape</th><th>max abs</th>"
        "<th>max rel</th><th>cosine</th><th>rel L2</th><th>verdict</th></tr>",
    ]
    for name, b in report.backends.items():
        if not b.outputs:
            parts.append(f'<tr><td>{_e(name)}</td><td colspan="7">{_e(_backend_line(b))}</td></tr>')
        for out_name, m in b.outputs.items():
            cls = "pass" if m.passed else "fail"
            parts.append(
                f'<tr class="{cls}"><td>{_e(name)}</td><td>{_e(out_name)}</td><td>{_e(_shape(m.shape))}</td>'
                f'<td class="n">{num(m.max_abs)}</td><td class="n">{num(m.max_rel)}</td>'
                f'<td class="n">{m.cosine:.7f}</td><td class="n">{num(m.rel_l2)}</td>'
                f'<td class="s">{_e("pass" if m.passed else "FAIL " + m.reason)}</td></tr>'
            )
    parts.append("</table>")
    for name, lr in _layer_reports(report):
        c = lr.counts
        fd = lr.first_divergence
        parts.append(
            f"<h2>Per-layer on {_e(name)}</h2><p>{c['layers']} layers: {c['matched']} matched "
            f"({c['passed']} pass, {c['failed']} fail, {c['aliased']} aliases), {c['fused']} fused, "
            f"{c['unmatched']} not matched, {c['not_called']} not called; "
            f"{lr.extra_outputs} values exposed as extra outputs, one run. Layer tolerance: "
            f"{_e(lr.tolerance_rule)} (base {_e(lr.tolerance.describe())}).</p>"
        )
        if fd is None:
            parts.append('<div class="ok">First divergence: none — every compared layer is within tolerance.</div>')
        else:
            parts.append(
                f'<div class="callout"><b>First divergence: <code>{_e(fd.name)}</code></b><br>'
                f"{_e(fd.explanation)}</div>"
            )
        png = base64.b64encode(plot_layer_errors(lr, f"{report.model}: error along depth on {name}")).decode()
        parts.append(f'<p><img alt="error along depth on {_e(name)}" src="data:image/png;base64,{png}"></p>')
        parts.append(
            "<table><tr><th>#</th><th>module</th><th>type</th><th>op</th><th>ONNX node</th><th>shape</th>"
            "<th>max abs</th><th>max rel</th><th>cosine</th><th>atol_eff</th><th>status</th></tr>"
        )
        first_name = fd.name if fd is not None else None
        parts.extend(_layer_row(i, layer, first_name) for i, layer in enumerate(lr.layers))
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_compare_report(report: CompareReport, path: str | Path) -> Path:
    """Write ``report`` as JSON, Markdown or HTML according to the suffix of ``path`` (atomically)."""
    target = Path(path)
    kind = FORMATS.get(target.suffix.lower())
    if kind is None:
        raise UsageError(
            f"cannot tell the report format from {target.name!r}; use a path ending in .json, .md or .html"
        )
    if kind == "json":
        text = compare_report_json(report)
    elif kind == "markdown":
        text = compare_report_markdown(report)
    else:
        text = compare_report_html(report)
    return write_text(target, text)
