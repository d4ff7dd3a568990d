"""Rendering of report objects as rich tables (the CLI's only job besides parsing)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from normfold.numerics.compare import CompareReport
    from normfold.runtime.base import BackendStatus


def fmt(x: float) -> str:
    return "inf" if x == float("inf") else f"{x:.3g}"


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
            s.name,
            verdict(s.available, "yes" if s.available else "no"),
            ",".join(s.precisions),
            s.reason or s.description,
        )
    return table


def compare_table(report: CompareReport) -> Table:
    table = Table(title=f"{report.model} vs eager ({report.precision}: {report.tolerance.describe()})")
    for col in ("backend", "output", "shape", "max abs", "max rel", "cosine", "rel L2", "mismatch", "verdict"):
        table.add_column(col, justify="right" if col not in ("backend", "output", "verdict") else "left")
    for name, b in report.backends.items():
        if not b.outputs:
            table.add_row(
                name,
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
                name,
                out_name,
                "x".join(map(str, m.shape)),
                fmt(m.max_abs),
                fmt(m.max_rel),
                f"{m.cosine:.7f}",
                fmt(m.rel_l2),
                f"{m.mismatch_fraction:.2%}",
                verdict(m.passed, None if m.passed else f"FAIL {m.reason}"),
            )
    return table
