"""``normfold bench``: latency per backend and batch size, JSON/PNG output and baseline regression check.

Exit codes: 0 done (no regression), 1 a real regression against ``--baseline``, 2 bad input (unknown
backend, non-ONNX file, shapes that do not fit), 3 an explicitly requested backend cannot run here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from normfold.cli._app import EXIT_CHECK_FAILED, command, csv, emit_json, err, out
from normfold.errors import UsageError

if TYPE_CHECKING:
    from normfold.bench.regression import RegressionReport
    from normfold.bench.report import BenchReport

#: Warn when the medians of a run's blocks differ by more than this fraction of its p50.
DRIFT_WARN = 0.10
INPUT_HELP = "NAME:SHAPE for dynamic dimensions other than the batch, e.g. x:1x3x224x224 (repeatable)."


def _ms(x: float) -> str:
    return f"{x:.4g}" if x < 1000 else f"{x:,.0f}"


def bench_table(report: BenchReport) -> Table:
    """One row per (backend, batch size); latencies in ms, throughput in samples/s."""
    env = report.environment
    threads = env.get("threads", {})
    title = (
        f"{escape(Path(report.onnx_path).name)} · {escape(str(env.get('cpu_model')))} · "
        f"{threads.get('intra_op_threads')} intra-op threads"
    )
    table = Table(title=title, caption="latencies in ms · first run = session/engine build + first inference")
    cols = ("backend", "batch", "first run", "min", "p50", "p90", "p95", "p99", "max", "mean ± std", "samples/s")
    for col in (*cols, "iters", "copies"):
        table.add_column(col, justify="left" if col in ("backend", "copies") else "right")
    for r in report.results:
        s = r.stats
        table.add_row(
            escape(r.backend),
            str(r.batch_size),
            _ms(r.first_run_ms),
            _ms(s.min_ms),
            f"[bold]{_ms(s.p50_ms)}[/]",
            _ms(s.p90_ms),
            _ms(s.p95_ms),
            _ms(s.p99_ms),
            _ms(s.max_ms),
            f"{_ms(s.mean_ms)} ± {_ms(s.std_ms)}",
            f"{s.throughput:,.0f}",
            str(s.iterations),
            "included" if r.copies_included else "none",
        )
    return table


_STATUS_STYLE = {
    "regressed": "bold red",
    "noise": "yellow",
    "improved": "green",
    "unchanged": "dim",
    "new": "cyan",
    "missing": "magenta",
}


def regression_table(reg: RegressionReport, only_moved: bool = True) -> Table:
    """What moved against the baseline: p50 before/after, change, noise band and verdict."""
    table = Table(title=f"vs baseline {escape(reg.baseline)} (max regression {reg.max_regression:.0%}, z={reg.z:g})")
    for col in ("backend", "batch", "baseline p50", "p50 now", "change", "noise band", "verdict"):
        table.add_column(col, justify="left" if col in ("backend", "verdict") else "right")
    rows = reg.moved() if only_moved else reg.entries
    for e in rows:
        style = _STATUS_STYLE.get(e.status, "")
        table.add_row(
            escape(e.backend),
            str(e.batch_size),
            "-" if e.baseline_p50_ms is None else _ms(e.baseline_p50_ms),
            "-" if e.current_p50_ms is None else _ms(e.current_p50_ms),
            "-" if e.change is None else f"{e.change:+.1%}",
            "-" if e.noise_ms is None else f"±{_ms(e.noise_ms)}",
            f"[{style}]{e.status}[/]" if style else e.status,
        )
    return table


def _wide(console: Console) -> Console:
    """Pipes and CI logs get the 13-column table unsqueezed; a real terminal keeps its own width."""
    if console.is_terminal or console.width >= 160:
        return console
    return Console(file=console.file, width=160, soft_wrap=True, no_color=console.no_color)


def _parse_batches(text: str | None) -> list[int] | None:
    if not text:
        return None
    sizes: list[int] = []
    for item in csv(text):
        try:
            value = int(item)
        except ValueError:
            raise UsageError(
                f"--batch expects comma-separated positive integers such as 1,8,32, got {text!r}"
            ) from None
        if value < 1:
            raise UsageError(f"--batch sizes must be >= 1, got {value}")
        sizes.append(value)
    return sizes


def _parse_inputs(specs: list[str] | None) -> dict[str, tuple[int, ...]]:
    if not specs:
        return {}
    from normfold.models.loader import parse_input_spec

    parsed = [parse_input_spec(s) for s in specs]
    return {p.name: tuple(p.shape) for p in parsed}


def _write_json(report: BenchReport, target: str) -> None:
    payload = report.to_dict()
    if target == "-":
        emit_json(payload)
        return
    from normfold.io import json_text, write_text

    write_text(target, json_text(payload))


@command("bench")
def bench_cmd(
    onnx_path: Path = typer.Argument(..., help="ONNX model to benchmark."),
    model_ref: str = typer.Option(
        None, "--model", help="PyTorch model for the torch eager baseline: zoo:NAME, file.py:factory, pkg.mod:factory"
    ),
    weights: str = typer.Option(None, "--weights", help="state_dict for --model, loaded strictly."),
    backend: str = typer.Option(
        None, "--backend", "-b", help="Comma-separated backends (default: ort-cpu, plus torch when --model is given)."
    ),
    batch: str = typer.Option(None, "--batch", help="Comma-separated batch sizes (default: the model's own)."),
    warmup: int = typer.Option(None, "--warmup", help="Warm-up calls before measuring (default 10)."),
    warmup_s: float = typer.Option(None, "--warmup-s", help="Warm up for this many seconds instead."),
    iters: int = typer.Option(None, "--iters", help="Measured calls (default 200)."),
    duration: float = typer.Option(None, "--duration", help="Measure for this many seconds instead."),
    threads: int = typer.Option(
        None, "--threads", help="Intra-op threads for ORT and torch alike (default: torch.get_num_threads())."
    ),
    inter_op_threads: int = typer.Option(None, "--inter-op-threads", help="ORT inter-op threads."),
    graph_opt: str = typer.Option(
        "all", "--graph-opt", help="ORT graph optimization: disable|basic|extended|layout|all"
    ),
    torch_compile: bool = typer.Option(False, "--torch-compile", help="Run the torch baseline through torch.compile."),
    cuda_graph: bool = typer.Option(False, "--cuda-graph", help="CUDA graph capture/replay on ort-cuda and ort-trt."),
    inputs: list[str] = typer.Option(None, "--input", help=INPUT_HELP),
    seed: int = typer.Option(0, "--seed", help="Seed of the random inputs."),
    json_out: str = typer.Option(None, "--json", help="Write the JSON report to this path (atomically); '-' = stdout."),
    plot: Path = typer.Option(None, "--plot", help="Write a PNG: latency distribution and p50 vs batch size."),
    baseline: Path = typer.Option(None, "--baseline", help="Earlier --json to compare p50s against."),
    max_regression: str = typer.Option("10%", "--max-regression", help="Allowed p50 increase, e.g. 10% (or 0.1)."),
) -> None:
    """Latency per backend and batch size with first-run, percentiles and throughput; exit 1 on a regression."""
    from normfold.bench import benchmark

    if warmup is not None and warmup_s is not None:
        raise UsageError("give either --warmup N or --warmup-s S, not both")
    if iters is not None and duration is not None:
        raise UsageError("give either --iters N or --duration S, not both")
    backends = csv(backend) if backend else (["torch", "ort-cpu"] if model_ref else ["ort-cpu"])
    loaded = None
    if model_ref:
        from normfold.models.loader import load_model

        loaded = load_model(model_ref, weights=weights)
    elif weights:
        raise UsageError("--weights needs --model")
    to_stdout = json_out == "-"
    from normfold.io import check_output

    for target, flag in ((None if to_stdout else json_out, "--json"), (plot, "--plot")):
        if target is not None and not Path(target).parent.exists():
            raise UsageError(f"output directory {Path(target).parent} does not exist")
        check_output(target, inputs=[onnx_path, baseline, weights], flag=flag)  # before the benchmark, not after
    console: Console = err if to_stdout else out
    with err.status("benchmarking…") as status:
        report = benchmark(
            onnx_path,
            backends=backends,
            batch_sizes=_parse_batches(batch),
            warmup=10 if warmup is None else warmup,
            warmup_s=warmup_s,
            iters=200 if iters is None else iters,
            duration_s=duration,
            threads=threads,
            inter_op_threads=inter_op_threads,
            model=loaded,
            graph_optimization_level=graph_opt,
            torch_compile=torch_compile,
            cuda_graph=cuda_graph,
            inputs=_parse_inputs(inputs),
            seed=seed,
            baseline=baseline,
            max_regression=max_regression,
            progress=lambda msg: status.update(f"benchmarking {escape(msg)}"),
        )
    _render(report, console, seed=seed, json_out=json_out, plot=plot)
    if not report.passed:
        raise typer.Exit(EXIT_CHECK_FAILED)


def _render(report: BenchReport, console: Console, *, seed: int, json_out: str | None, plot: Path | None) -> None:
    """Write the requested files, then the table, drift warnings and the regression verdict."""
    to_stdout = json_out == "-"
    if json_out:
        _write_json(report, json_out)
    if plot:
        from normfold.bench import write_plot

        write_plot(report, plot)
    if not to_stdout:
        _wide(console).print(bench_table(report))
        th = report.environment["threads"]
        console.print(
            f"threads: intra-op {th['intra_op_threads']}, inter-op {th['inter_op_threads'] or 'default'}"
            + (f", torch {th['torch_threads']}" if th.get("torch_threads") else "")
            + f" · inputs: seeded random (seed {seed})",
            highlight=False,
        )
    for r in report.results:
        if r.stats.drift_ms > DRIFT_WARN * r.stats.p50_ms:
            console.print(
                f"[yellow]warning:[/] {escape(r.backend)} batch {r.batch_size}: the median moved by "
                f"{r.stats.drift_ms / r.stats.p50_ms:.0%} between parts of the run (other load on this machine?); "
                "a longer --duration averages over it"
            )
    reg = report.regression
    if reg is not None:
        for w in reg.warnings:
            console.print(f"[yellow]warning:[/] {escape(w)}")
        if reg.moved():
            _wide(console).print(regression_table(reg))
        verdict = "[bold red]REGRESSION[/]" if reg.regressed else "[green]no regression[/]"
        console.print(f"{verdict} beyond {reg.max_regression:.0%} (and the noise band) against {escape(reg.baseline)}")
    if not to_stdout:
        for target in (json_out, plot):
            if target:
                console.print(f"wrote {escape(str(target))}")
