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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from normfold.errors import BackendUnavailableError, NormfoldError
from normfold.gate.records import CaseTolerance, Divergence, OutputMetrics

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
    settings: dict[str, Any]
    weights: str | None = None
    onnx: str | None = None
    inputs: list[str] | None = None
    inputs_npz: str | None = None
    required: bool = False
    bench: bool = False
    #: None: probe the backend where the case runs (Ray); "": probed available; text: why it cannot run.
    unavailable: str | None = None
    #: ``{"p50_ms", "p90_ms", "artifact", "threshold"}`` of the stored baseline, to confirm a regression.
    latency_baseline: dict[str, Any] | None = None
    #: Where to store the measured model for later interleaved runs (``--update-baseline``).
    artifact_out: str | None = None

    @property
    def timeout_s(self) -> float:
        return float(self.settings.get("timeout_s", 600.0))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CaseResult:
    """The verdict of one case with everything a report needs.

    ``tolerance``, ``outputs`` and ``first_divergence`` are typed; assigning the JSON form (a dict, as
    read back from a report) builds the typed value, so a result round-trips through ``to_dict()``.
    """

    case_id: str
    model: str
    backend: str
    precision: str
    status: CaseStatus
    reason: str = ""
    stage: str = ""
    tolerance: CaseTolerance | None = None
    outputs: dict[str, OutputMetrics] = field(default_factory=dict)
    first_divergence: Divergence | None = None
    layers: dict[str, Any] | None = None
    optimize: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None
    baseline: dict[str, Any] = field(default_factory=dict)
    input_source: str = ""
    fail_on: str = ""
    onnx_path: str = ""
    notes: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "outputs":
            value = {key: OutputMetrics.of(m) for key, m in value.items()}
        elif name == "first_divergence" and value is not None:
            value = Divergence.of(value)
        elif name == "tolerance" and value is not None:
            value = CaseTolerance.of(value) if value else None
        super().__setattr__(name, value)

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
        opt = self.optimize or {}
        if not opt.get("available"):
            return ""
        before, after = opt.get("ops_before"), opt.get("ops_after")
        nodes = ""
        if isinstance(before, dict) and isinstance(after, dict):
            nodes = f", {sum(before.values())} → {sum(after.values())} nodes"
        return f"optimized: {opt.get('applied', '?')} rewrites{nodes}"

    def fail(self, reason: str, stage: str, status: CaseStatus = "failed") -> None:
        """Mark the case failing; reasons accumulate (a drift on top of a latency regression, say)."""
        if self.failing and self.reason:
            self.reason = f"{self.reason}; {reason}"
        else:
            self.reason, self.stage = reason, stage
        if self.status != "error":
            self.status = status

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["tolerance"] is None:
            d["tolerance"] = {}  # the JSON form of a case that never got a tolerance (skipped at the probe)
        d["passed"] = self.passed
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaseResult:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def _error_text(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def describe_divergence(first: Divergence | None) -> str:
    """One line: where the numbers first went wrong, and by how much (empty when nothing diverged)."""
    return first.describe() if first is not None else ""


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

    tol = tolerance_for(spec.precision, s.get("atol"), s.get("rtol"))
    result.tolerance = CaseTolerance.of(tol)

    stage.name = "load"
    from normfold.models.loader import load_model, parse_input_spec

    specs = [parse_input_spec(t) for t in spec.inputs] if spec.inputs else None
    loaded = load_model(spec.ref, weights=spec.weights, inputs=specs, seed=s.get("seed"))

    if spec.onnx:
        onnx_path = Path(spec.onnx)
        result.notes.append(f"checked the given artifact {onnx_path} as-is (no export, no optimize)")
    else:
        stage.name = "export"
        from normfold.exporter import export

        exported = export(loaded, None, tmp / "model.onnx", opset=int(s["opset"]), exporter=s["exporter"])
        onnx_path = exported.path
        if s.get("optimize", True):
            stage.name = "optimize"
            onnx_path = _optimize(onnx_path, tmp / "model.opt.onnx", s.get("passes"), result, spec.backend)
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
    result.optimize = {
        "available": True,
        "target": target,
        "applied": report.applied,
        "ops_before": report.ops_before,
        "ops_after": report.ops_after,
        "total_seconds": report.total_seconds,
    }
    return Path(report.output or dst)


def _output_tolerances(spec: CaseSpec) -> dict[str, Any]:
    """Per-output tolerances from the config, each falling back to the case's atol/rtol."""
    from normfold.numerics.tolerances import tolerance_for

    s = spec.settings
    allow = bool(s.get("allow_nonfinite", False))
    found = {}
    for name, ot in (s.get("outputs") or {}).items():
        atol = ot.get("atol") if ot.get("atol") is not None else s.get("atol")
        rtol = ot.get("rtol") if ot.get("rtol") is not None else s.get("rtol")
        found[name] = tolerance_for(spec.precision, atol, rtol, allow_nonfinite=allow)
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
        "atol": s.get("atol"),
        "rtol": s.get("rtol"),
        "fail_on": s.get("fail_on"),
        "allow_nonfinite": bool(s.get("allow_nonfinite", False)),
        "output_tolerances": _output_tolerances(spec),
    }
    per_layer = bool(s.get("per_layer", True))
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
    metrics = {name: OutputMetrics.of(m) for name, m in backend.outputs.items()}
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
        result.layers = backend.layers.to_dict()
        first = backend.layers.first_divergence
        result.first_divergence = None if first is None else Divergence.of(first)
    if backend.status == "failed" and not backend.outputs:
        result.fail(backend.reason, "compare")  # e.g. output count differs from eager
        return
    _verdict(result, metrics, report.fail_on)


def _verdict(result: CaseResult, metrics: dict[str, OutputMetrics], fail_on: str) -> None:
    """Fail on outputs out of tolerance, or on a diverging layer when layers decide; say which."""
    line = describe_divergence(result.first_divergence)
    bad = [name for name, m in metrics.items() if not m.passed]
    if bad:
        worst = max(bad, key=lambda n: metrics[n].max_abs)
        m = metrics[worst]
        reason = f"outputs {bad} out of tolerance; {worst}: {m.describe()}"
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
        stored = store_artifact(onnx_path, Path(spec.artifact_out))
        if stored:
            latency["artifact"] = stored
    result.latency = latency
    if latency.get("verdict") == "unstable":
        result.notes.append(f"latency unstable: {latency.get('note', 'the p50 did not settle')}")
    budget = (s.get("latency_budget_ms") or {}).get(spec.backend)
    p50 = latency.get("p50_ms")
    if budget is not None and p50 is not None:
        latency["budget_ms"] = float(budget)
        if p50 > budget:
            result.fail(f"latency p50 {p50:.3f} ms exceeds the budget {budget:g} ms", "bench")
