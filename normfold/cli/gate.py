"""``normfold gate`` (the CI numerics gate) and ``normfold demo`` (the gate over the built-in zoo)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich import box
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from normfold._format import num
from normfold.cli._app import EXIT_CHECK_FAILED, EXIT_OK, command, csv, emit_json, err, out

if TYPE_CHECKING:
    from normfold.gate import CaseResult, CaseSpec, GateConfig, GateReport

log = logging.getLogger(__name__)

DEMO_REPORT_DIR = "normfold-report"
_STYLE = {"passed": "green", "failed": "red", "error": "magenta", "skipped": "yellow"}


def gate_table(report: GateReport) -> Table:
    """One row per case; reasons go below the table (:func:`print_reasons`) so it fits an 80-column log."""
    table = Table(title=f"normfold gate ({report.source})", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("model", overflow="ellipsis", no_wrap=True)
    for col in ("backend", "verdict", "max abs", "max rel", "p50 ms"):
        right = col in ("max abs", "max rel", "p50 ms")
        table.add_column(col, justify="right" if right else "left", no_wrap=True, min_width=len(col))
    for case in report.cases:
        style = _STYLE.get(case.status, "white")
        p50 = case.latency.p50_ms if case.latency else None
        table.add_row(
            escape(case.model),
            f"{case.backend} {case.precision}",
            f"[{style}]{case.status}[/]",
            num(case.max_abs, missing="-"),
            num(case.max_rel, missing="-"),
            num(p50, ".3f", missing="-"),
        )
    return table


def print_reasons(report: GateReport) -> None:
    """Why each case did not pass; identical skip reasons are printed once with their cases."""
    skips: dict[str, list[str]] = {}
    for case in report.cases:
        if case.status == "skipped":
            skips.setdefault(case.reason, []).append(case.case_id)
        elif case.status != "passed":
            style = _STYLE.get(case.status, "white")
            out.print(f"[{style}]{case.status}[/] {escape(case.case_id)}: {escape(case.reason)}")
    for reason, ids in skips.items():
        shown = ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
        out.print(f"[yellow]skipped[/] {escape(shown)}: {escape(reason)}")


class _ProgressSink:
    """Progress over cases: a rich bar, or one plain log line per case with ``--quiet``."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.total = 0
        self.done = 0
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        self.started: dict[str, float] = {}

    def plan(self, specs: list[CaseSpec]) -> None:
        self.total = len(specs)
        if self.quiet:
            err.print(f"gate: {self.total} cases", markup=False, highlight=False)
        elif self.progress is not None:
            self.task = self.progress.add_task("gate", total=self.total)

    def start(self, spec: CaseSpec) -> None:
        self.started[spec.case_id] = time.perf_counter()
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, description=f"running {spec.case_id}")

    def finish(self, result: CaseResult) -> None:
        self.done += 1
        if self.quiet:
            reason = f": {result.reason}" if result.reason and result.status != "passed" else ""
            err.print(
                f"[{self.done}/{self.total}] {result.case_id} {result.status} ({result.duration_s:.1f} s){reason}",
                markup=False,
                highlight=False,
            )
        elif self.progress is not None and self.task is not None:
            style = _STYLE.get(result.status, "white")
            self.progress.console.print(
                f"[{style}]{result.status:>7}[/] {escape(result.case_id)} ({result.duration_s:.1f} s)"
            )
            self.progress.advance(self.task)

    @contextlib.contextmanager
    def running(self) -> Iterator[_ProgressSink]:
        if self.quiet:
            yield self
            return
        self.progress = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
            transient=False,
        )
        with self.progress:
            yield self


def _run_and_render(
    config: str | Path | GateConfig | None,
    *,
    quiet: bool,
    as_json: bool = False,
    **kwargs: object,
) -> GateReport:
    from normfold.gate import run_gate

    sink = _ProgressSink(quiet)
    with sink.running():
        report = run_gate(config, on_plan=sink.plan, on_start=sink.start, on_done=sink.finish, **kwargs)  # type: ignore[arg-type]
    if as_json:
        emit_json(report.to_dict())
        return report
    if not quiet:
        out.print(gate_table(report))
    print_reasons(report)
    for note in report.notes:
        out.print(f"note: {note}", markup=False, highlight=False)
    for kind, path in report.written.items():
        out.print(f"wrote {kind}: {path}", markup=False, highlight=False)
    style = "green" if report.passed else "red"
    out.print(f"[{style}]{escape(report.verdict_line())}[/]")
    return report


@command("gate")
def gate_cmd(
    config: Path = typer.Argument(
        None, help="normfold.toml, a pyproject.toml with a tool.normfold table, or their directory (default: .)"
    ),
    junit: Path = typer.Option(None, "--junit", help="Write JUnit XML here (one testcase per case)."),
    summary: Path = typer.Option(None, "--summary", help="Write a Markdown summary (e.g. $GITHUB_STEP_SUMMARY)."),
    html: Path = typer.Option(None, "--html", help="Write a self-contained HTML report with per-layer plots."),
    json_path: Path = typer.Option(None, "--json", help="Write the JSON report here ('-' for stdout)."),
    jobs: int = typer.Option(None, "--jobs", "-j", min=1, help="Cases run in parallel (worker processes)."),
    executor: str = typer.Option(None, "--executor", help="local | process | ray (default: process when jobs > 1)."),
    ray_address: str = typer.Option(None, "--ray-address", help="Ray cluster address for --executor ray."),
    update_baseline: bool = typer.Option(
        False, "--update-baseline", help="Store each passing case's metrics and p50 latency as the baseline."
    ),
    require: list[str] = typer.Option(
        None, "--require", help="Backend whose absence is a failure, not a skip (repeatable, or comma-separated)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Plain log lines instead of a progress bar and table."),
) -> None:
    """Run the CI numerics gate: every model × backend × precision in the config against eager.

    Exit 0 when every case that ran passed, 1 when any failed (or nothing ran), 2 on a config error.
    """
    to_stdout = json_path is not None and str(json_path) == "-"
    report = _run_and_render(
        config,
        quiet=quiet or to_stdout,
        as_json=to_stdout,
        junit=junit,
        summary=summary,
        html=html,
        json_path=None if to_stdout else json_path,
        jobs=jobs,
        executor=executor,
        ray_address=ray_address,
        update_baseline_file=update_baseline,
        require=[b for item in require or [] for b in csv(item)] or None,
    )
    raise typer.Exit(EXIT_OK if report.passed else EXIT_CHECK_FAILED)


def demo_config() -> GateConfig:
    """The built-in demo config (package data ``normfold/gate/demo.toml``), paths relative to the cwd."""
    from importlib import resources

    from normfold.gate.config import config_from_dict, tomllib

    text = resources.files("normfold.gate").joinpath("demo.toml").read_text(encoding="utf-8")
    return config_from_dict(tomllib.loads(text), source="normfold/gate/demo.toml (built-in)", base_dir=Path.cwd())


@command("demo")
def demo_cmd(
    jobs: int = typer.Option(None, "--jobs", "-j", min=1, help="Cases run in parallel (worker processes)."),
    executor: str = typer.Option(None, "--executor", help="local | process | ray"),
    ray_address: str = typer.Option(None, "--ray-address", help="Ray cluster address for --executor ray."),
    report_dir: Path = typer.Option(Path(DEMO_REPORT_DIR), "--report-dir", help="Where the reports go."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Plain log lines instead of a progress bar and table."),
) -> None:
    """The gate over the whole built-in zoo: export → optimize → compare → bench, reports in ./normfold-report/."""
    from normfold.io import check_output

    check_output(report_dir, kind="dir", flag="--report-dir")
    report_dir.mkdir(parents=True, exist_ok=True)
    report = _run_and_render(
        demo_config(),
        quiet=quiet,
        junit=report_dir / "junit.xml",
        summary=report_dir / "summary.md",
        html=report_dir / "report.html",
        json_path=report_dir / "report.json",
        jobs=jobs,
        executor=executor,
        ray_address=ray_address,
    )
    out.print(f"reports are in {report_dir.resolve()}/ (open report.html in a browser)", markup=False, highlight=False)
    raise typer.Exit(EXIT_OK if report.passed else EXIT_CHECK_FAILED)
