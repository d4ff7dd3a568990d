"""Rendering of report objects as rich tables (the CLI's only job besides parsing)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.markup import escape
from rich.table import Table

from normfold._format import num

if TYPE_CHECKING:
    from rich.console import Console

    from normfold.numerics.compare import CompareReport
    from normfold.numerics.layers import LayerReport
    from normfold.numerics.metrics import TensorMetrics
    from normfold.runtime.base import BackendStatus


def verdict(ok: bool | None, text: str | None = None) -> str:
    if ok is None:
        return f"[yellow]{escape(text or 'skipped')}[/]"
    return f"[green]{escape(text or 'pass')}[/]" if ok else f"[red]{escape(text or 'FAIL')}[/]"


def backends_table(statuses: list[BackendStatus]) -> Table:
    table = Table(title="backends")
    table.add_column("backend", style="bold")
    table.add_column("available")
    table.add_column("precisions")
    table.add_column("reason / description", overflow="fold")
    for s in statuses:
        table.add_row(
            escape(s.name),
            verdict(s.available, "yes" if s.available else "no"),
            ",".join(s.precisions),
            escape(s.reason or s.description),
        )
    return table


def _nonfinite(m: TensorMetrics) -> str:
    """`` (3 non-finite, ref 3)`` when either side holds NaN/Inf: the count belongs in every report."""
    return f" ({m.nonfinite} non-finite, ref {m.expected_nonfinite})" if m.nonfinite or m.expected_nonfinite else ""


def compare_table(report: CompareReport) -> Table:
    table = Table(title=escape(f"{report.model} vs eager ({report.precision}: {report.tolerance.describe()})"))
    for col in ("backend", "output", "shape", "max abs", "max rel", "cosine", "rel L2", "mismatch", "verdict"):
        table.add_column(col, justify="right" if col not in ("backend", "output", "verdict") else "left")
    for name, b in report.backends.items():
        if not b.outputs:
            table.add_row(
                escape(name),
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                verdict(None if b.status == "skipped" else False, f"{b.status}: {b.reason}"),
            )
            continue
        for out_name, m in b.outputs.items():
            table.add_row(
                escape(name),
                escape(out_name),
                "x".join(map(str, m.shape)),
                num(m.max_abs),
                num(m.max_rel),
                f"{m.cosine:.7f}",
                num(m.rel_l2),
                f"{m.mismatch_fraction:.2%}",
                verdict(m.passed, None if m.passed else f"FAIL {m.reason}")
                + (
                    f" ({m.nonfinite} non-finite, ref {m.expected_nonfinite})"
                    if m.nonfinite or m.expected_nonfinite
                    else ""
                ),
            )
    return table


def layers_table(layers: LayerReport, title: str = "") -> Table:
    """Every layer of one backend in execution order; the first divergence is marked with ➜."""
    c = layers.counts
    table = Table(
        title=title
        or (
            f"per-layer on {layers.backend}: {c['matched']} matched ({c['passed']} pass, {c['failed']} fail), "
            f"{c['fused']} fused, {c['unmatched']} not matched; {c['aliased']} aliases, {c['not_called']} not called"
        )
    )
    for col in ("#", "module", "type", "op", "shape", "max abs", "max rel", "atol_eff", "status"):
        table.add_column(col, justify="right" if col in ("#", "max abs", "max rel", "atol_eff") else "left")
    first = layers.first_divergence
    first_name = first.name if first is not None else None
    for i, layer in enumerate(layers.layers):
        alias = f" (same value as {escape(layer.alias_of)})" if layer.alias_of else ""
        if layer.status == "pass":
            status = verdict(True) + alias
        elif layer.status == "fail":
            status = verdict(False) + alias
        elif layer.status == "fused":
            status = f"[magenta]{escape(layer.status_text)}[/]"
        else:
            status = verdict(None, layer.status_text)
        name = escape(layer.name)
        if layer.name == first_name:
            name = f"[bold red]➜ {name}[/]"
        table.add_row(
            str(i),
            name,
            escape(layer.module_type),
            escape(layer.op_type or "-"),
            "x".join(map(str, layer.shape)) or "-",
            "-" if layer.max_abs is None else num(layer.max_abs),
            "-" if layer.max_rel is None else num(layer.max_rel),
            "-" if layer.tolerance is None else num(layer.tolerance.atol),
            status,
        )
    return table


def layers_summary(report: CompareReport, console: Console | None = None) -> None:
    """Print each backend's per-layer table and its first divergence, highlighted, on ``console``."""
    if console is None:
        from normfold.cli._app import out

        console = out
    for name, b in report.backends.items():
        layers = b.layers
        if layers is None:
            continue
        console.print(layers_table(layers))
        console.print(f"layer tolerance: {escape(layers.tolerance_rule)} (base {escape(layers.tolerance.describe())})")
        first = layers.first_divergence
        if first is None:
            console.print(f"[green]first divergence on {escape(name)}: none[/] (every compared layer matches eager)")
        else:
            console.print(f"[bold red]first divergence on {escape(name)}: {escape(first.name)}[/]")
            console.print(f"  {escape(first.explanation)}")
