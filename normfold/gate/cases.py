"""Gate cases: one model × backend × precision, run end to end into a verdict.

A case runs: availability probe → load the eager model → export (or take the given ONNX artifact) →
optimize for the case's backend → compare against eager, outputs and every
layer from one eager run and one backend run → optional benchmark → verdict. :class:`CaseSpec` and
:class:`CaseResult` hold typed data that pickles (:mod:`normfold.gate.records`), so a case can run in
this process, in a worker process or as a Ray task and come back unchanged.

Statuses:

* ``passed``: every output within tolerance, and every matched layer too when layers decide
  (``fail_on = "layers"``, the default at fp32/tf32), and within the latency budget when one is set.
* ``failed``: the case ran and its numbers (or its latency) are wrong.
* ``error``: the case could not be evaluated: load/export failure, a crash, a timeout.
* ``skipped``: the backend cannot run here (the reason says why). Never counted as passed; with
  ``require`` it becomes ``failed``.
"""

from __future__ import annotations

import logging
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from normfold.errors import BackendUnavailableError, NormfoldError
from normfold.gate.config import CaseSettings
from normfold.gate.records import (
    BaselineCheck,
    CaseLatency,
    LatencyReference,
    OptimizeSummary,
    divergence_from_dict,
    layer_report_from_dict,
    metrics_from_dict,
    portable_layers,
    tolerance_from_dict,
)
from normfold.numerics.layer_report import FirstDivergence, LayerReport
from normfold.numerics.metrics import TensorMetrics
from normfold.numerics.tolerances import Tolerance

log = logging.getLogger(__name__)

CaseStatus = Literal["passed", "failed", "error", "skipped"]
FAILING: tuple[str, ...] = ("failed", "error")


@dataclass
class CaseSpec:
    """Everything a worker needs to run one case; paths are absolute."""

    case_id: str
    model: str
    ref: str
    backend: str
    precision: str
    settings: CaseSettings
    weights: str | None = None
    onnx: str | None = None
    inputs: list[str] | None = None
    inputs_npz: str | None = None
    required: bool = False
    bench: bool = False
    #: None: probe the backend where the case runs (Ray); "": probed available; text: why it cannot run.
    unavailable: str | None = None
    #: The stored baseline's latency, to confirm a regression.
    latency_baseline: LatencyReference | None = None
    #: Where to store the measured model for later interleaved runs (``--update-baseline``).
    artifact_out: str | None = None

    @property
    def timeout_s(self) -> float:
        return self.settings.timeout_s


@dataclass(slots=True)
class CaseResult:
    """The verdict of one case with everything a report needs, typed; ``to_dict``/``from_dict`` are its
    JSON form in the gate report."""

    case_id: str
    model: str
    backend: str
    precision: str
    status: CaseStatus
    reason: str = ""
    stage: str = ""
    tolerance: Tolerance | None = None
    outputs: dict[str, TensorMetrics] = field(default_factory=dict)
    first_divergence: FirstDivergence | None = None
    layers: LayerReport | None = None
    optimize: OptimizeSummary | None = None
    latency: CaseLatency | None = None
    baseline: BaselineCheck | None = None
    input_source: str = ""
    fail_on: str = ""
    onnx_path: str = ""
    notes: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def failing(self) -> bool:
        return self.status in FAILING

    @property
    def max_abs(self) -> float | None:
        return max((o.max_abs for o in self.outputs.values()), default=None)

    @property
    def max_rel(self) -> float | None:
        return max((o.max_rel for o in self.outputs.values()), default=None)

    @property
    def min_cosine(self) -> float | None:
        return min((o.cosine for o in self.outputs.values()), default=None)

    def nonfinite_summary(self) -> str:
        """``non-finite: y 12 (reference 12)`` for outputs holding NaN/Inf on either side, else empty."""
        found = [
            f"{name} {m.nonfinite} (reference {m.expected_nonfinite})"
            for name, m in self.outputs.items()
            if m.nonfinite or m.expected_nonfinite
        ]
        return f"non-finite: {', '.join(found)}" if found else ""

    def optimize_summary(self) -> str:
        """``optimized: 9 rewrites, 31 → 22 nodes`` (empty when the case was not optimized)."""
        return "" if self.optimize is None else self.optimize.describe()

    def fail(self, reason: str, stage: str, status: CaseStatus = "failed") -> None:
        """Mark the case failing; reasons accumulate (a drift on top of a latency regression, say)."""
        if self.failing and self.reason:
            self.reason = f"{self.reason}; {reason}"
        else:
            self.reason, self.stage = reason, stage
        if self.status != "error":
            self.status = status

    def to_dict(self) -> dict[str, Any]:
        def as_json(value: Any) -> Any:
            return None if value is None else value.to_dict()

        return {
            **{name: getattr(self, name) for name in _PLAIN_FIELDS},
            # {} is the JSON form of a case that never got a tolerance (skipped at the probe)
            "tolerance": {} if self.tolerance is None else self.tolerance.to_dict(),
            "outputs": {name: m.to_dict() for name, m in self.outputs.items()},
            "first_divergence": as_json(self.first_divergence),
            "layers": as_json(self.layers),
            "optimize": as_json(self.optimize),
            "latency": as_json(self.latency),
            "baseline": {} if self.baseline is None else self.baseline.to_dict(),
            "notes": list(self.notes),
            "passed": self.passed,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaseResult:
        """The case of a report's ``cases`` entry; keys it does not know are ignored."""

        def read(key: str, reader: Callable[[Any], Any]) -> Any:
            value = data.get(key)
            return reader(value) if value else None

        return cls(
            **{name: data[name] for name in _PLAIN_FIELDS if name in data},
            tolerance=read("tolerance", tolerance_from_dict),
            outputs={name: metrics_from_dict(m) for name, m in (data.get("outputs") or {}).items()},
            first_divergence=read("first_divergence", divergence_from_dict),
            layers=read("layers", layer_report_from_dict),
            optimize=read("optimize", OptimizeSummary.from_dict),
            latency=read("latency", CaseLatency.from_dict),
            baseline=read("baseline", BaselineCheck.from_dict),
            notes=list(data.get("notes", [])),
        )


#: CaseResult fields whose JSON form is the value itself.
_PLAIN_FIELDS: tuple[str, ...] = (
    "case_id",
    "model",
    "backend",
    "precision",
    "status",
    "reason",
    "stage",
    "input_source",
    "fail_on",
    "onnx_path",
    "duration_s",
)


def _error_text(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def describe_divergence(first: FirstDivergence | None) -> str:
    """One line: where the numbers first went wrong, and by how much (empty when nothing diverged)."""
    if first is None:
        return ""
    where = first.name or first.module or first.onnx_node or "?"
    op = f" ({first.op_type})" if first.op_type else ""
    node = f" at ONNX node {first.onnx_node}" if first.onnx_node and first.module else ""
    return f"first divergent layer: {where}{op}{node} (max_abs={first.max_abs:.3g}, max_rel={first.max_rel:.3g})"


def describe_metrics(m: TensorMetrics) -> str:
    """``max_abs=… max_rel=… cosine=… mismatch=… (atol=…, rtol=…, atol_eff=…)``: why an output failed."""
    return (
        f"max_abs={m.max_abs:.3g} max_rel={m.max_rel:.3g} cosine={m.cosine:.6f} "
        f"mismatch={m.mismatch_fraction:.2%} "
        f"(atol={m.atol:g}, rtol={m.rtol:g}, atol_eff={m.atol_eff or m.atol:.3g})"
    )


class _Stage:
    """Records which stage a case is in, so an unexpected exception names it."""

    def __init__(self) -> None:
        self.name = "setup"


def probe_reason(backend: str, precision: str) -> str:
    """Empty when ``backend`` runs ``precision`` here, else exactly why not (probes are cached per process)."""
    from normfold.runtime.registry import get_backend

    try:
        get_backend(backend).ensure_available(precision)
    except BackendUnavailableError as e:
        return str(e)
    return ""


def run_case(spec: CaseSpec) -> CaseResult:
    """Run one case to a verdict. Never raises: every failure becomes the case's status and reason."""
    started = time.perf_counter()
    result = CaseResult(spec.case_id, spec.model, spec.backend, spec.precision, status="passed")
    stage = _Stage()
    try:
        with tempfile.TemporaryDirectory(prefix="normfold-gate-") as tmp:
            _run(spec, result, Path(tmp), stage)
    except NormfoldError as e:
        result.status, result.stage = "error", stage.name
        result.reason = f"{stage.name}: {_error_text(e)}"
    except KeyboardInterrupt:
        raise  # the user's Ctrl-C (or SIGTERM) ends the gate, not just this case
    except BaseException as e:  # SystemExit from model code outside the guard, too: this case's error
        from normfold.models.guard import describe_escape

        log.debug("case %s raised in %s:\n%s", spec.case_id, stage.name, traceback.format_exc())
        result.status, result.stage = "error", stage.name
        if isinstance(e, Exception):
            result.reason = f"{stage.name}: unexpected {_error_text(e)}"
        else:
            result.reason = f"{stage.name}: model code {describe_escape(e)}"
    result.duration_s = time.perf_counter() - started
    return result


def _run(spec: CaseSpec, result: CaseResult, tmp: Path, stage: _Stage) -> None:
    from normfold.numerics.tolerances import tolerance_for

    s = spec.settings
    stage.name = "probe"
    reason = spec.unavailable if spec.unavailable is not None else probe_reason(spec.backend, spec.precision)
    if reason:
        if spec.required:
            result.status, result.stage = "failed", "probe"
            result.reason = f"required backend unavailable: {reason}"
        else:
            result.status, result.stage, result.reason = "skipped", "probe", reason
        return

    result.tolerance = tolerance_for(spec.precision, s.atol, s.rtol)

    stage.name = "load"
    from normfold.models.loader import load_model, parse_input_spec

    specs = [parse_input_spec(t) for t in spec.inputs] if spec.inputs else None
    loaded = load_model(spec.ref, weights=spec.weights, inputs=specs, seed=s.seed)

    if spec.onnx:
        onnx_path = Path(spec.onnx)
        result.notes.append(f"checked the given artifact {onnx_path} as-is (no export, no optimize)")
    else:
        stage.name = "export"
        from normfold.exporter import export

        exported = export(loaded, None, tmp / "model.onnx", opset=s.opset, exporter=s.exporter)
        onnx_path = exported.path
        if s.optimize:
            stage.name = "optimize"
            onnx_path = _optimize(onnx_path, tmp / "model.opt.onnx", s.passes, result, spec.backend)
    result.onnx_path = str(onnx_path)

    stage.name = "compare"
    _compare(spec, loaded, onnx_path, result)
    if result.status == "skipped":
        return

    if spec.bench and result.status == "passed":
        stage.name = "bench"
        _bench(spec, onnx_path, result)


def _optimize(src: Path, dst: Path, passes: list[str] | None, result: CaseResult, backend: str) -> Path:
    """Optimize for the case's backend (its norm forms); a backend that is not a runtime gets ``portable``."""
    from normfold.fusers import optimize
    from normfold.fusers.lowering import TARGETS

    target = backend if backend in TARGETS else "portable"
    report = optimize(src, dst, passes=passes, target=target)
    result.optimize = OptimizeSummary.of(report, target)
    return Path(report.output or dst)


def _output_tolerances(spec: CaseSpec) -> dict[str, Tolerance]:
    """Per-output tolerances from the config, each falling back to the case's atol/rtol."""
    from normfold.numerics.tolerances import tolerance_for

    s = spec.settings
    found = {}
    for name, ot in s.outputs.items():
        atol = ot.atol if ot.atol is not None else s.atol
        rtol = ot.rtol if ot.rtol is not None else s.rtol
        found[name] = tolerance_for(spec.precision, atol, rtol, allow_nonfinite=s.allow_nonfinite)
    return found


def _compare(spec: CaseSpec, loaded: Any, onnx_path: Path, result: CaseResult) -> None:
    """One compare call: one eager run, one backend run; outputs and layers judge the same arrays."""
    from normfold.numerics import compare

    s = spec.settings
    kwargs: dict[str, Any] = {
        "backends": [spec.backend],
        "precision": spec.precision,
        "skip_unavailable": True,
        "model_name": spec.model,
        "atol": s.atol,
        "rtol": s.rtol,
        "fail_on": s.fail_on,
        "allow_nonfinite": s.allow_nonfinite,
        "output_tolerances": _output_tolerances(spec),
    }
    per_layer = s.per_layer
    try:
        report = compare(loaded, onnx_path, spec.inputs_npz, per_layer=per_layer, **kwargs)
    except NormfoldError as e:
        if not per_layer:
            raise
        # The instrumented copy could not run (a backend limit on extra outputs, say): judge the outputs.
        result.notes.append(f"per-layer diff failed: {_error_text(e)}")
        report = compare(loaded, onnx_path, spec.inputs_npz, per_layer=False, **kwargs)
    result.input_source = report.input_source
    result.fail_on = report.fail_on
    backend = report.backends[spec.backend]
    if backend.status == "skipped":
        if spec.required:
            result.fail(f"required backend unavailable: {backend.reason}", "compare")
        else:
            result.status, result.stage, result.reason = "skipped", "compare", backend.reason
        return
    if backend.status == "error":
        result.fail(f"{spec.backend} failed to run the model: {backend.reason}", "compare", "error")
        return
    metrics = dict(backend.outputs)
    unknown = sorted(set(kwargs["output_tolerances"]) - set(metrics))
    if unknown and metrics:
        result.fail(
            f"config sets tolerances for outputs {unknown}, but the ONNX outputs are {sorted(metrics)}",
            "compare",
            "error",
        )
        return
    result.outputs = metrics
    if backend.layers is not None:
        result.layers = portable_layers(backend.layers)
        result.first_divergence = backend.layers.first_divergence
    if backend.status == "failed" and not backend.outputs:
        result.fail(backend.reason, "compare")  # e.g. output count differs from eager
        return
    _verdict(result, metrics, report.fail_on)


def _verdict(result: CaseResult, metrics: dict[str, TensorMetrics], fail_on: str) -> None:
    """Fail on outputs out of tolerance, or on a diverging layer when layers decide; say which."""
    line = describe_divergence(result.first_divergence)
    bad = [name for name, m in metrics.items() if not m.passed]
    if bad:
        worst = max(bad, key=lambda n: metrics[n].max_abs)
        m = metrics[worst]
        reason = f"outputs {bad} out of tolerance; {worst}: {describe_metrics(m)}"
        if m.reason:
            reason += f"; {m.reason}"
        result.fail(f"{line}; {reason}" if line else reason, "compare")
        return
    if not line:
        return
    if fail_on == "layers":
        result.fail(f"{line}; layer out of tolerance while the outputs pass (masked downstream)", "compare")
    else:
        result.notes.append(f"{line}: masked downstream, not judged (fail_on = outputs)")


def _bench(spec: CaseSpec, onnx_path: Path, result: CaseResult) -> None:
    """Latency measured until stable (:mod:`normfold.gate.latency`); the budget is judged here, a baseline
    regression (already confirmed by re-measuring) by :func:`normfold.gate.baseline.apply_baseline`."""
    from normfold.gate.latency import measure_latency, store_artifact

    s = spec.settings
    latency = measure_latency(onnx_path, spec.backend, spec.precision, s, spec.latency_baseline)
    if spec.artifact_out:
        latency.artifact = store_artifact(onnx_path, Path(spec.artifact_out))
    result.latency = latency
    if latency.verdict == "unstable":
        result.notes.append(f"latency unstable: {latency.note or 'the p50 did not settle'}")
    budget = s.latency_budget_ms.get(spec.backend)
    if budget is not None:
        latency.budget_ms = float(budget)
        if latency.p50_ms > budget:
            result.fail(f"latency p50 {latency.p50_ms:.3f} ms exceeds the budget {budget:g} ms", "bench")
