"""``run_gate``: config → cases → executor → baseline → GateReport (+ report files)."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from normfold.errors import ConfigError, NormfoldError
from normfold.gate.baseline import (
    Baseline,
    apply_baseline,
    artifact_path,
    load_baseline,
    update_baseline,
)
from normfold.gate.cases import CaseResult, CaseSpec, probe_reason
from normfold.gate.config import EXECUTORS, GateConfig, load_config
from normfold.gate.executors import run_cases
from normfold.gate.report import GateReport, write_json
from normfold.io import check_output

log = logging.getLogger(__name__)

DEFAULT_BASELINE = "normfold-baseline.json"


def plan_cases(
    config: GateConfig,
    *,
    require: list[str] | None = None,
    baseline: Baseline | None = None,
    update: bool = False,
    baseline_path: Path | None = None,
) -> list[CaseSpec]:
    """Expand every model × backend × precision into a :class:`CaseSpec` (ids are unique and stable)."""
    required = set(config.require) | set(require or [])
    specs: list[CaseSpec] = []
    seen: set[str] = set()
    for index, model in enumerate(config.models):
        settings = model.settings(config.defaults)
        name = model.display_name
        if model.inputs and model.inputs_npz:
            raise ConfigError(
                f"{config.source}: models[{index}] ({name}) sets both 'inputs' and 'inputs_npz'; pick one"
            )
        for backend in settings.backends:
            for precision in settings.precisions:
                case_id = f"{name}[{backend}-{precision}]"
                if case_id in seen:
                    raise ConfigError(
                        f"{config.source}: two models produce case {case_id}; give them distinct 'name' keys"
                    )
                seen.add(case_id)
                entry = baseline.cases.get(case_id) if baseline else None
                latency_ref = None if entry is None else entry.latency_reference(config.latency_regression)
                bench = settings.bench or backend in settings.latency_budget_ms or update or latency_ref is not None
                if update:
                    latency_ref = None
                elif latency_ref is not None and latency_ref.artifact and baseline is not None:
                    absolute = str(Path(baseline.path).parent / latency_ref.artifact)
                    latency_ref = dataclasses.replace(latency_ref, artifact=absolute)
                specs.append(
                    CaseSpec(
                        case_id=case_id,
                        model=name,
                        ref=model.ref,
                        backend=backend,
                        precision=precision,
                        settings=settings,
                        weights=_abs(config, model.weights),
                        onnx=_abs(config, model.onnx),
                        inputs=model.inputs,
                        inputs_npz=_abs(config, model.inputs_npz),
                        required=backend in required,
                        bench=bench,
                        latency_baseline=latency_ref,
                        artifact_out=str(artifact_path(baseline_path, case_id)) if update and baseline_path else None,
                    )
                )
    return specs


def _abs(config: GateConfig, path: str | None) -> str | None:
    resolved = config.resolve(path)
    return str(resolved) if resolved is not None else None


def _environment() -> dict[str, Any]:
    import numpy
    import onnx
    import torch

    import normfold

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "normfold": normfold.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "numpy": numpy.__version__,
    }
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        env["onnxruntime"] = None
    return env


def run_gate(
    config_path_or_config: str | Path | GateConfig | None = None,
    *,
    jobs: int | None = None,
    executor: str | None = None,
    ray_address: str | None = None,
    update_baseline_file: bool = False,
    require: list[str] | None = None,
    baseline: str | Path | None = None,
    junit: str | Path | None = None,
    summary: str | Path | None = None,
    html: str | Path | None = None,
    json_path: str | Path | None = None,
    on_start: Callable[[CaseSpec], None] | None = None,
    on_done: Callable[[CaseResult], None] | None = None,
    on_plan: Callable[[list[CaseSpec]], None] | None = None,
) -> GateReport:
    """Run the gate. Keyword arguments override the config file (which overrides built-in defaults).

    Writes the reports named by the arguments or the config's ``[reports]`` table and lists them in
    ``report.written``. Raises :class:`ConfigError` for a bad config; every case outcome, including
    crashes and timeouts, is a verdict in the report, never an exception.
    """
    config = (
        config_path_or_config if isinstance(config_path_or_config, GateConfig) else load_config(config_path_or_config)
    )
    executor_name = executor or (
        config.executor if config.executor else ("process" if (jobs or config.jobs) > 1 else "local")
    )
    if executor_name not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor_name!r}; expected one of {', '.join(EXECUTORS)}")
    n_jobs = jobs or config.jobs
    if require:
        from normfold.runtime.registry import parse_backends

        require = parse_backends(require)
    baseline_path = Path(baseline) if baseline else config.resolve(config.baseline)
    if update_baseline_file and baseline_path is None:
        baseline_path = config.base_dir / DEFAULT_BASELINE
    previous = load_baseline(baseline_path) if baseline_path is not None else None
    specs = plan_cases(
        config, require=require, baseline=previous, update=update_baseline_file, baseline_path=baseline_path
    )
    reports = _report_paths(config, junit=junit, summary=summary, html=html, json_path=json_path)
    _check_outputs(config, reports, baseline_path if update_baseline_file else None, baseline_path)
    if executor_name in ("local", "process"):
        _probe_here(specs)
    if on_plan is not None:
        on_plan(specs)

    report = GateReport(
        source=config.source,
        executor=executor_name,
        jobs=n_jobs,
        started_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        required=sorted(set(config.require) | set(require or [])),
        baseline_path=str(baseline_path) if baseline_path else None,
        environment=_environment(),
    )
    started = time.perf_counter()
    done: dict[str, CaseResult] = {}
    try:
        report.cases = _run_all(
            specs, done, executor_name, n_jobs, ray_address or config.ray_address, on_start, on_done
        )
    except KeyboardInterrupt:
        # Ctrl-C or SIGTERM: still leave reports that say which cases got no verdict, then stop.
        report.cases = [done.get(s.case_id) or _no_verdict(s, "interrupted before a verdict") for s in specs]
        report.duration_s = time.perf_counter() - started
        report.notes.append("interrupted: cases without a verdict are errors")
        _write_reports_best_effort(report, reports)
        raise

    _settle_baseline(report, config, previous, baseline_path, update_baseline_file)
    report.duration_s = time.perf_counter() - started
    _write_reports(report, reports)
    log.info("%s", report.verdict_line())
    return report


def _check_outputs(
    config: GateConfig, reports: dict[str, Path], baseline_out: Path | None, baseline_in: Path | None
) -> None:
    """Every file the gate will write is writable and overwrites none of its inputs: checked before
    minutes of cases, not after."""
    for kind, path in reports.items():
        check_output(path, inputs=[config.path, baseline_in], flag=kind)
    if baseline_out is not None:
        check_output(baseline_out, inputs=[config.path], flag="baseline")


def _probe_here(specs: list[CaseSpec]) -> None:
    """Same machine: probe each backend once here instead of once per worker (a CUDA probe costs
    seconds). Ray cases probe where they run, since the cluster's machines may differ from this one."""
    probes: dict[tuple[str, str], str] = {}
    for spec in specs:
        key = (spec.backend, spec.precision)
        if key not in probes:
            probes[key] = probe_reason(*key)
        spec.unavailable = probes[key]


def _settle_baseline(
    report: GateReport, config: GateConfig, previous: Baseline | None, path: Path | None, update: bool
) -> None:
    """Judge the cases against the stored baseline, or store them in it (``--update-baseline``)."""
    if previous is not None and not update:
        apply_baseline(
            report.cases,
            previous,
            drift_factor=config.drift_factor,
            drift_floor=config.drift_floor,
            latency_threshold=config.latency_regression,
        )
    elif path is not None and not update:
        report.notes.append(f"no baseline at {path} yet; create it with --update-baseline")
    if update and path is not None:
        stored = update_baseline(report.cases, path, previous)
        report.baseline_updated = True
        report.notes.append(f"baseline {path} updated ({len(stored.cases)} cases)")


def _no_verdict(spec: CaseSpec, reason: str) -> CaseResult:
    return CaseResult(
        spec.case_id, spec.model, spec.backend, spec.precision, status="error", reason=reason, stage="executor"
    )


def _run_all(
    specs: list[CaseSpec],
    done: dict[str, CaseResult],
    executor: str,
    jobs: int,
    ray_address: str | None,
    on_start: Callable[[CaseSpec], None] | None,
    on_done: Callable[[CaseResult], None] | None,
) -> list[CaseResult]:
    """Every planned case with a verdict, in plan order: a case the executor lost, or could not finish
    because the executor itself failed, is an ``error`` saying so, never a silent gap that could pass.
    ``done`` collects verdicts as they arrive, so an interrupted run still knows them.
    """

    def finished(result: CaseResult) -> None:
        done[result.case_id] = result
        if on_done is not None:
            on_done(result)

    kwargs: dict[str, Any] = {"on_done": finished}
    if on_start is not None:
        kwargs["on_start"] = on_start
    try:
        for result in run_cases(specs, executor=executor, jobs=jobs, ray_address=ray_address, **kwargs):
            done.setdefault(result.case_id, result)
    except (NormfoldError, KeyboardInterrupt):
        raise
    except Exception as e:
        log.debug("executor %s failed", executor, exc_info=True)
        reason = f"no verdict: the {executor} executor failed ({type(e).__name__}: {e})"
        return [done.get(s.case_id) or _no_verdict(s, reason) for s in specs]
    return [done.get(s.case_id) or _no_verdict(s, "no verdict: the executor returned no result") for s in specs]


def _report_paths(
    config: GateConfig,
    *,
    junit: str | Path | None,
    summary: str | Path | None,
    html: str | Path | None,
    json_path: str | Path | None,
) -> dict[str, Path]:
    """Where each report goes: the argument, else the config's ``[reports]`` entry; unset ones are left out."""
    paths = {
        "junit": junit or config.resolve(config.reports.junit),
        "summary": summary or config.resolve(config.reports.summary),
        "html": html or config.resolve(config.reports.html),
        "json": json_path or config.resolve(config.reports.json_path),
    }
    return {kind: Path(path) for kind, path in paths.items() if path is not None}


def _write_reports(report: GateReport, paths: dict[str, Path]) -> None:
    from normfold.gate.html import write_html
    from normfold.gate.junit import write_junit
    from normfold.gate.markdown import write_markdown

    writers = {"junit": write_junit, "summary": write_markdown, "html": write_html, "json": write_json}
    for kind, path in paths.items():
        writers[kind](report, path)
        report.written[kind] = str(path)


def _write_reports_best_effort(report: GateReport, paths: dict[str, Path]) -> None:
    """After an interrupt: a failing writer must not hide the signal."""
    try:
        _write_reports(report, paths)
    except (NormfoldError, OSError) as e:
        log.warning("could not write the gate's reports after the interrupt: %s", e)
