"""Typed parts of a gate case: its optimize summary, latency, baseline check, and the JSON readers.

A :class:`~normfold.gate.cases.CaseResult` crosses process boundaries (pickled to a worker process and
back, or returned by a Ray task) and is rendered by four writers (markdown, HTML, JUnit, JSON) and the
baseline. It carries numerics' own reports for what numerics measured (:class:`~normfold.numerics.
tolerances.Tolerance`, :class:`~normfold.numerics.metrics.TensorMetrics`, :class:`~normfold.numerics.
layer_report.FirstDivergence`, :class:`~normfold.numerics.layer_report.LayerReport`) and the records below
for what only the gate knows. Dicts appear only at the file boundary: every record's ``to_dict()`` is its
JSON form and ``from_dict()`` reads it back; the ``*_from_dict`` functions read numerics' reports back
from the gate's report JSON (numerics writes JSON but never reads it).

Readers ignore keys they do not know and default the optional ones, so a report or baseline written by an
older normfold still loads.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from normfold.bench.stats import LatencyStats
from normfold.numerics.layer_report import FirstDivergence, LayerReport, LayerResult
from normfold.numerics.metrics import TensorMetrics
from normfold.numerics.tolerances import Tolerance

if TYPE_CHECKING:  # the gate imports the fuser pipeline lazily, only for cases that optimize
    from normfold.bench.measure import StableMeasurement
    from normfold.fusers.report import OptimizeReport

T = TypeVar("T")


#: How :func:`normfold.io.json_text` writes the non-finite floats that strict JSON has no literal for.
_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def known_fields(cls: type[T], data: Mapping[str, Any], **overrides: Any) -> T:
    """``cls(**data)`` over the keys ``cls`` declares (JSON-only and unknown keys dropped), plus ``overrides``.

    A float field written as ``"inf"``/``"-inf"``/``"nan"`` (strict JSON) is read back as that float.
    """
    fields = {f.name: str(f.type) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kept = {k: v for k, v in data.items() if k in fields}
    for key, value in kept.items():
        if isinstance(value, str) and value in _NONFINITE and "float" in fields[key]:
            kept[key] = _NONFINITE[value]
    return cls(**{**kept, **overrides})


def _omit_none(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None}


# --------------------------------------------------------------------------------------------------------
# numerics' reports, read back from the gate's JSON


def tolerance_from_dict(data: Mapping[str, Any]) -> Tolerance:
    return known_fields(Tolerance, data)


def metrics_from_dict(data: Mapping[str, Any]) -> TensorMetrics:
    return known_fields(
        TensorMetrics,
        data,
        shape=tuple(data.get("shape", ())),
        expected_shape=tuple(data.get("expected_shape", ())),
    )


def divergence_from_dict(data: Mapping[str, Any]) -> FirstDivergence:
    return known_fields(FirstDivergence, data)


def _layer_from_dict(data: Mapping[str, Any]) -> LayerResult:
    tol, metrics = data.get("tolerance"), data.get("metrics")
    return known_fields(
        LayerResult,
        data,
        shape=tuple(data.get("shape", ())),
        tolerance=None if tol is None else tolerance_from_dict(tol),
        metrics=None if metrics is None else metrics_from_dict(metrics),
        inputs_from=list(data.get("inputs_from", [])),
        absorbed=list(data.get("absorbed", [])),
    )


def layer_report_from_dict(data: Mapping[str, Any]) -> LayerReport:
    """The per-layer report of :meth:`LayerReport.to_dict`; ``passed``/``counts``/``first_divergence``
    are derived from the rows again, and the graph outputs (arrays) are not part of the JSON."""
    functional = data.get("functional") or {}
    return known_fields(
        LayerReport,
        data,
        tolerance=tolerance_from_dict(data["tolerance"]),
        layers=[_layer_from_dict(row) for row in data.get("layers", [])],
        functional_calls=int(functional.get("calls", 0)),
        functional_matched=int(functional.get("matched", 0)),
    )


def portable_layers(report: LayerReport) -> LayerReport:
    """``report`` without the graph outputs of its run: a case carries the rows, not the tensors."""
    return dataclasses.replace(report, outputs={})


# --------------------------------------------------------------------------------------------------------
# what only the gate knows


@dataclass(frozen=True, slots=True)
class OptimizeSummary:
    """What the gate keeps of an :class:`~normfold.fusers.report.OptimizeReport`: how much it rewrote."""

    target: str
    applied: int
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    total_seconds: float

    @classmethod
    def of(cls, report: OptimizeReport, target: str) -> OptimizeSummary:
        """The summary of what :func:`normfold.fusers.optimize` did for ``target``."""
        return cls(target, report.applied, dict(report.ops_before), dict(report.ops_after), report.total_seconds)

    def describe(self) -> str:
        """``optimized: 9 rewrites, 31 → 22 nodes``."""
        before, after = sum(self.ops_before.values()), sum(self.ops_after.values())
        return f"optimized: {self.applied} rewrites, {before} → {after} nodes"

    def to_dict(self) -> dict[str, Any]:
        return {"available": True, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OptimizeSummary:
        return known_fields(cls, data)


@dataclass(frozen=True, slots=True)
class LatencyReference:
    """What a case needs from the stored baseline to confirm a latency regression itself."""

    p50_ms: float
    threshold: float
    p90_ms: float | None = None
    #: The baseline's stored model (absolute once planned), for interleaved timing.
    artifact: str | None = None


@dataclass(frozen=True, slots=True)
class Windows:
    """How the p50 settled (the JSON form of :class:`~normfold.bench.measure.StableMeasurement`, no samples)."""

    windows: int
    window_p50_ms: list[float]
    stable: bool
    stability: float
    spread: float

    @classmethod
    def of(cls, run: StableMeasurement) -> Windows:
        """The windows of one run measured until stable."""
        return known_fields(cls, run.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class LatencyConfirm:
    """How a suspected regression was confirmed: interleaved with the baseline artifact, or re-measured."""

    method: str
    rounds: int | None = None
    ratio: float | None = None
    low_quartile: float | None = None
    p50_ms: float | None = None
    stable: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return _omit_none(dataclasses.asdict(self))


@dataclass(slots=True)
class CaseLatency:
    """A case's latency: steady-state statistics, how they settled, and the verdict against the baseline.

    ``verdict`` is one of :data:`normfold.gate.latency.VERDICTS`.
    """

    p50_ms: float
    p90_ms: float
    min_ms: float
    max_ms: float
    mean_ms: float
    std_ms: float
    iterations: int
    threads: int
    stability: Windows | None = None
    verdict: str = "no baseline"
    note: str = ""
    confirm: LatencyConfirm | None = None
    ratio: float | None = None
    budget_ms: float | None = None
    artifact: str | None = None

    @classmethod
    def of(cls, stats: LatencyStats, *, threads: int, stability: Windows) -> CaseLatency:
        """The latency of one steady-state run (its verdict not judged yet)."""
        return known_fields(cls, stats.to_dict(), threads=threads, stability=stability)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["stability"] = None if self.stability is None else self.stability.to_dict()
        data["confirm"] = None if self.confirm is None else self.confirm.to_dict()
        return _omit_none({k: v for k, v in data.items() if k != "note" or v})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CaseLatency:
        stability, confirm = data.get("stability"), data.get("confirm")
        defaults = {k: 0.0 for k in ("min_ms", "max_ms", "mean_ms", "std_ms")}
        return known_fields(
            cls,
            {"p90_ms": data["p50_ms"], "iterations": 0, "threads": 1, **defaults, **data},
            stability=None if stability is None else known_fields(Windows, stability),
            confirm=None if confirm is None else known_fields(LatencyConfirm, confirm),
        )


@dataclass(frozen=True, slots=True)
class OutputError:
    """One output's stored error (a baseline keeps these three of :class:`TensorMetrics`)."""

    max_abs: float
    max_rel: float | None = None
    rel_l2: float | None = None

    @classmethod
    def of(cls, metrics: TensorMetrics) -> OutputError:
        return cls(metrics.max_abs, metrics.max_rel, metrics.rel_l2)


@dataclass(frozen=True, slots=True)
class BaselineEntry:
    """One case in the baseline file: output errors, per-layer ``max_abs`` and latency when measured.

    The on-disk form is version 1 of the baseline file; ``artifact`` is relative to the baseline there.
    """

    outputs: dict[str, OutputError] = field(default_factory=dict)
    atol: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    artifact: str | None = None
    #: ``max_abs`` of every compared layer (execution order), so drift can name where it started.
    layers: dict[str, float] | None = None

    def latency_reference(self, threshold: float) -> LatencyReference | None:
        """What a case needs to confirm a regression itself, or None when no latency was stored."""
        if self.p50_ms is None:
            return None
        return LatencyReference(self.p50_ms, threshold, self.p90_ms, self.artifact)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "outputs": {name: _omit_none(dataclasses.asdict(e)) for name, e in self.outputs.items()},
            "atol": self.atol,
        }
        data.update(_omit_none({"p50_ms": self.p50_ms, "p90_ms": self.p90_ms, "artifact": self.artifact}))
        if self.layers is not None:
            data["layers"] = dict(self.layers)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BaselineEntry:
        outputs = {
            name: known_fields(OutputError, e)
            for name, e in (data.get("outputs") or {}).items()
            if isinstance(e, Mapping) and "max_abs" in e
        }
        layers = data.get("layers")
        return known_fields(
            cls,
            data,
            outputs=outputs,
            layers=None if layers is None else {str(k): float(v) for k, v in layers.items()},
        )


@dataclass(frozen=True, slots=True)
class BaselineCheck:
    """What a case was compared with in the baseline, and what that found (drift, a regression)."""

    path: str
    entry: BaselineEntry
    findings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "entry": self.entry.to_dict(), "findings": list(self.findings)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BaselineCheck:
        return cls(str(data["path"]), BaselineEntry.from_dict(data["entry"]), list(data.get("findings", [])))
