"""Baselines: remember each case's error and latency, flag drift and regressions on later runs.

``--update-baseline`` stores, per passing case, every output's ``max_abs``/``max_rel``/``rel_l2`` and,
when the case was benchmarked, its ``p50_ms`` and ``p90_ms``. Later runs compare against it:

* **Numeric drift**: an output's ``max_abs`` grew beyond ``drift_factor`` × its baseline, where the
  baseline is first raised to a floor of ``drift_floor · atol``. The floor keeps rounding-level noise
  (1e-7 → 3e-7 under ``atol=1e-5``) from reading as drift; a real change to the graph moves errors by
  orders of magnitude. The baseline also keeps every compared layer's ``max_abs``, so a drift names the
  first layer (execution order) whose error grew the same way: where it started.
* **Latency regression**: the case measures until its p50 is stable and compares side by side with the
  baseline's stored model (``<baseline stem>-artifacts/``) or re-measures before it calls a regression
  (:mod:`normfold.gate.latency`); only a confirmed ``regressed`` verdict fails. Results without a verdict
  (older callers) fall back to: the p50 exceeds the baseline p50 by more than ``latency_regression`` *and*
  by more than the larger of both runs' p90−p50 spreads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normfold.errors import ConfigError
from normfold.gate.cases import CaseResult
from normfold.gate.records import BaselineCheck, BaselineEntry, OutputError
from normfold.io import json_text, write_text
from normfold.numerics.layer_report import LayerReport, LayerResult

log = logging.getLogger(__name__)

BASELINE_VERSION = 1


@dataclass
class Baseline:
    """Stored metrics per case id; ``to_dict``/``from_dict`` are the on-disk form (version 1)."""

    cases: dict[str, BaselineEntry] = field(default_factory=dict)
    path: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"version": BASELINE_VERSION, "cases": {case: e.to_dict() for case, e in self.cases.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str = "") -> Baseline:
        return cls({case: BaselineEntry.from_dict(e) for case, e in data["cases"].items()}, path)


def load_baseline(path: str | Path) -> Baseline | None:
    """The baseline at ``path``, or None when the file does not exist yet."""
    p = Path(path)
    if not p.exists():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"baseline {p} is not readable JSON ({e}); delete it or rerun with --update-baseline") from e
    if not isinstance(data, dict) or data.get("version") != BASELINE_VERSION or not isinstance(data.get("cases"), dict):
        raise ConfigError(
            f"baseline {p} is not a normfold baseline (expected version {BASELINE_VERSION} with a 'cases' table); "
            f"rerun with --update-baseline"
        )
    try:
        return Baseline.from_dict(data, str(p))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"baseline {p} has a malformed case entry ({e}); rerun with --update-baseline") from e


def baseline_entry(result: CaseResult) -> BaselineEntry:
    """What the baseline keeps of a passing case."""
    latency = result.latency
    return BaselineEntry(
        outputs={name: OutputError.of(m) for name, m in result.outputs.items()},
        atol=_case_atol(result),
        p50_ms=None if latency is None else latency.p50_ms,
        p90_ms=None if latency is None else latency.p90_ms,
        artifact=None if latency is None else latency.artifact,
        layers=None if result.layers is None else _layer_errors(result.layers),
    )


def _case_atol(result: CaseResult) -> float | None:
    return result.tolerance.atol if result.tolerance is not None else None


def _compared(layers: LayerReport) -> list[LayerResult]:
    """The rows that carry an error: compared (pass or fail) with a ``max_abs``."""
    return [row for row in layers.layers if row.status in ("pass", "fail") and row.max_abs is not None]


def _layer_errors(layers: LayerReport) -> dict[str, float]:
    """``max_abs`` of every compared layer, so drift can name where the error started to grow."""
    return {row.name: float(row.max_abs or 0.0) for row in _compared(layers)}


def artifact_path(baseline_path: str | Path, case_id: str) -> Path:
    """Where ``--update-baseline`` keeps a case's measured model: ``<baseline stem>-artifacts/<case>.onnx``."""
    p = Path(baseline_path)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in case_id)
    return p.with_name(f"{p.stem}-artifacts") / f"{safe}.onnx"


def update_baseline(results: Sequence[CaseResult], path: str | Path, previous: Baseline | None = None) -> Baseline:
    """Store every passing case (others keep their previous entry) and write the file atomically."""
    cases = dict(previous.cases) if previous else {}
    for result in results:
        if result.passed:
            entry = baseline_entry(result)
            if entry.artifact:  # relative to the baseline, so the pair can move together
                relative = os.path.relpath(entry.artifact, Path(path).resolve().parent)
                entry = dataclasses.replace(entry, artifact=relative)
            cases[result.case_id] = entry
        else:
            log.info("baseline: %s not stored (%s)", result.case_id, result.status)
    baseline = Baseline(cases=dict(sorted(cases.items())), path=str(path))
    write_text(path, json_text(baseline.to_dict()))
    return baseline


def drift_origin(result: CaseResult, entry: BaselineEntry, factor: float, floor: float) -> str | None:
    """The first layer (execution order) whose max_abs grew beyond ``factor`` × max(baseline, floor·atol_eff).

    Layers are judged against their own effective tolerance, so rounding-level noise in a large-valued
    layer does not read as the origin; None when the baseline has no layers or none grew.
    """
    old = entry.layers or {}
    if result.layers is None:
        return None
    for row in _compared(result.layers):
        if row.name not in old:
            continue
        new = float(row.max_abs or 0.0)
        atol = (row.tolerance.atol if row.tolerance is not None else None) or _case_atol(result) or 0.0
        reference = max(old[row.name], floor * atol)
        if reference > 0 and new > factor * reference:
            return f"{row.name} (max_abs {new:.3g} vs baseline {old[row.name]:.3g})"
    return None


def drift_findings(result: CaseResult, entry: BaselineEntry, factor: float, floor: float) -> list[str]:
    """Outputs whose max_abs grew beyond ``factor`` × max(baseline, floor·atol), with the layer where the
    growth started when the baseline recorded layers."""
    findings = []
    atol = float(_case_atol(result) or entry.atol or 0.0)
    for name, old in entry.outputs.items():
        new = result.outputs.get(name)
        if new is None:
            continue
        reference = max(old.max_abs, floor * atol)
        if reference > 0 and new.max_abs > factor * reference:
            findings.append(
                f"numeric drift on {name}: max_abs {new.max_abs:.3g} > {factor:g}× baseline {old.max_abs:.3g}"
            )
    if findings:
        origin = drift_origin(result, entry, factor, floor)
        if origin:
            findings = [f"{f}; the error starts to grow at layer {origin}" for f in findings]
    return findings


def latency_regression(result: CaseResult, entry: BaselineEntry, threshold: float) -> str | None:
    """A reason when p50 rose beyond ``threshold`` and beyond both runs' noise band, else None.

    A case that confirmed its own suspicion (:mod:`normfold.gate.latency`: measured until stable,
    re-measured or interleaved with the baseline artifact) carries a judged ``verdict``; only
    ``regressed`` fails. A case measured without the baseline (``no baseline``) falls back to the
    noise-band rule.
    """
    latency = result.latency
    if latency is None or entry.p50_ms is None:
        return None
    if latency.verdict != "no baseline":
        from normfold.gate.latency import describe_regression

        if latency.verdict != "regressed":
            return None
        return describe_regression(latency, entry.p50_ms)
    new_p50, old_p50 = latency.p50_ms, entry.p50_ms
    spreads = [max(0.0, latency.p90_ms - new_p50)]
    if entry.p90_ms is not None:
        spreads.append(max(0.0, entry.p90_ms - old_p50))
    noise = max(spreads)
    shift = new_p50 - old_p50
    if shift > threshold * old_p50 and shift > noise:
        return (
            f"latency regression: p50 {new_p50:.3f} ms vs baseline {old_p50:.3f} ms "
            f"(+{shift / old_p50:.0%}, beyond {threshold:.0%} and the noise band {noise:.3f} ms)"
        )
    return None


def apply_baseline(
    results: Sequence[CaseResult],
    baseline: Baseline,
    *,
    drift_factor: float,
    drift_floor: float,
    latency_threshold: float,
) -> None:
    """Flag drift and regressions on the cases that ran; records what was compared on each result."""
    for result in results:
        entry = baseline.cases.get(result.case_id)
        if entry is None or result.status in ("skipped", "error"):
            continue
        findings = drift_findings(result, entry, drift_factor, drift_floor)
        regression = latency_regression(result, entry, latency_threshold)
        if regression:
            findings.append(regression)
        result.baseline = BaselineCheck(baseline.path, entry, findings)
        for finding in findings:
            result.fail(finding, "baseline")
