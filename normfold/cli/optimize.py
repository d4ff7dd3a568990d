"""``normfold optimize``: run the verified normalization passes on an ONNX file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from normfold.cli._app import command, emit_json, out

if TYPE_CHECKING:
    from rich.table import Table

    from normfold.fusers import OptimizeReport


def rules_table(report: OptimizeReport) -> Table:
    """One row per rule: how many candidate sites it saw, applied and skipped, and its wall time."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(f"{report.source} → {report.output or '(not written)'}"))
    table.add_column("rule", no_wrap=True)
    for col in ("matched", "applied", "skipped", "time ms"):
        table.add_column(col, justify="right")
    for name, rule in report.rules.items():
        ms = report.pass_seconds.get(name, 0.0) * 1e3
        table.add_row(name, str(rule.matched), str(rule.applied), str(rule.skipped), f"{ms:.1f}")
    return table


def sites_table(report: OptimizeReport) -> Table | None:
    """One row per candidate site: the nodes, applied or skipped, and why (None when there are none)."""
    from rich.markup import escape
    from rich.table import Table

    events = report.events()
    if not events:
        return None
    table = Table(title="sites")
    table.add_column("rule", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("nodes", overflow="fold", ratio=1)
    table.add_column("detail / reason", overflow="fold", ratio=2)
    for e in events:
        status = "[green]applied[/]" if e.status == "applied" else "[yellow]skipped[/]"
        table.add_row(e.rule, status, escape(" + ".join(e.nodes)), escape(e.reason))
    return table


def ops_table(report: OptimizeReport) -> Table:
    from rich.table import Table

    table = Table(title="op histogram and initializer bytes")
    for col in ("op", "before", "after"):
        table.add_column(col, justify="left" if col == "op" else "right")
    for op in sorted(set(report.ops_before) | set(report.ops_after)):
        before, after = report.ops_before.get(op, 0), report.ops_after.get(op, 0)
        style = "" if before == after else "bold"
        table.add_row(op, str(before), str(after), style=style)
    table.add_row("initializer bytes", f"{report.initializer_bytes_before:,}", f"{report.initializer_bytes_after:,}")
    return table


@command("optimize")
def optimize_cmd(
    onnx_path: Path = typer.Argument(..., help="ONNX model to optimize."),
    output: Path = typer.Option(None, "--output", "-o", help="Where to write the optimized model (atomically)."),
    passes: str = typer.Option(None, "--passes", help="Comma-separated pass names, in order (default: all)."),
    target: str = typer.Option(
        "portable",
        "--target",
        help="Runtime that will serve the model: portable|ort-cpu|ort-cuda|ort-trt|trt. Each norm gets the form "
        "that runtime runs fastest; portable keeps standard one-node forms any runtime loads.",
    ),
    target_opset: int = typer.Option(None, "--target-opset", help="Allow passes to raise the opset to N."),
    report_path: Path = typer.Option(None, "--report", help="Write the OptimizeReport as JSON (atomically)."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the before/after check on ORT CPU."),
    allow_weight_copies: bool = typer.Option(
        False, "--allow-weight-copies", help="Fold into shared weights by cloning them (more memory)."
    ),
    atol: float = typer.Option(None, "--atol", help="Verification absolute tolerance (default: fp32's, 1e-5)."),
    rtol: float = typer.Option(None, "--rtol", help="Verification relative tolerance (default: fp32's, 1e-4)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output on stdout."),
) -> None:
    """Fold BatchNorm/affine chains and fuse norms, verified on ORT CPU; a failing model is never written."""
    from normfold.fusers import optimize
    from normfold.io import check_output, write_text

    check_output(output, inputs=[onnx_path], flag="--output")
    check_output(report_path, inputs=[onnx_path, output], flag="--report")
    report = optimize(
        onnx_path,
        output,
        passes=passes,  # the raw "a,b" text: resolve_passes rejects a blank list such as ",,,"
        verify=not no_verify,
        target=target,
        target_opset=target_opset,
        allow_weight_copies=allow_weight_copies,
        atol=atol,
        rtol=rtol,
    )
    if report_path:
        write_text(report_path, report.to_json())
    if as_json:
        emit_json(report.to_dict())
        return
    from rich.markup import escape

    out.print(f"target: {report.target}")
    out.print(rules_table(report))
    sites = sites_table(report)
    if sites is not None:
        out.print(sites)
    out.print(ops_table(report))
    v = report.verification
    if v is None:
        out.print("[yellow]verification skipped (--no-verify)[/]")
    else:
        disabled = f"; disabled after failing: {len(v.disabled)} site(s)" if v.disabled else ""
        out.print(
            f"[green]verified[/] on ORT CPU: max abs {v.max_abs:.3g} (atol {v.atol:g}, rtol {v.rtol:g}, "
            f"seed {v.seed}){disabled}"
        )
        for e in v.disabled:
            out.print(f"  [yellow]disabled[/] {escape(e.rule)} at {escape(' + '.join(e.nodes))}: {escape(e.reason)}")
    for written in (output, report_path):
        if written:
            out.print(f"wrote {written}", markup=False, highlight=False)
