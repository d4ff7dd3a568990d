"""Baselines: remember each case's error and latency, flag drift and regressions on later runs.

``--update-baseline`` stores, per passing case, every output's ``max_abs``/``max_rel``/``rel_l2`` and,
when the case was benchmarked, its ``p50_ms`` and ``p90_ms``. Later runs compare against it:

* **Numeric drift**: an output's ``max_abs`` grew beyond ``drift_factor`` × its baseline, where the
  baseline is first raised to a floor of ``drift_floor · atol``. The floor keeps rounding-level noise
  (1e-7 → 3e-7 under ``atol=1e-5``) from reading as drift; a real change to the graph moves errors by
  orders of magnitude.
* **Latency regression** (noise-aware): the p50 must exceed the baseline p50 by more than
  ``latency_regression`` (a fraction) *and* by more than the noise band of both runs, taken as the
  larger of their p90−p50 spreads. One noisy run on a shared CI machine then does not fail the gate, while
  a real slowdown larger than the spread does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normfold.errors import ConfigError
from normfold.gate.cases import CaseResult
from normfold.io import json_text, write_text

log = logging.getLogger(__name__)

BASELINE_VERSION = 1


@dataclass
class Baseline:
    """Stored metrics per case id."""

    cases: dict[str, dict[str, Any]] = field(default_factory=dict)
    path: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"version": BASELINE_VERSION, "cases": self.cases}


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
    return Baseline(cases=data["cases"], path=str(p))


def baseline_entry(result: CaseResult) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "outputs": {
            name: {k: m[k] for k in ("max_abs", "max_rel", "rel_l2") if k in m} for name, m in result.outputs.items()
        },
        "atol": result.tolerance.get("atol"),
    }
    if result.latency and "p50_ms" in result.latency:
        entry["p50_ms"] = result.latency["p50_ms"]
        if "p90_ms" in result.latency:
            entry["p90_ms"] = result.latency["p90_ms"]
    return entry


def update_baseline(results: Sequence[CaseResult], path: str | Path, previous: Baseline | None = None) -> Baseline:
    """Store every passing case (others keep their previous entry) and write the file atomically."""
    cases = dict(previous.cases) if previous else {}
    for result in results:
        if result.passed:
            cases[result.case_id] = baseline_entry(result)
        else:
            log.info("baseline: %s not stored (%s)", result.case_id, result.status)
    baseline = Baseline(cases=dict(sorted(cases.items())), path=str(path))
    write_text(path, json_text(baseline.to_dict()))
    return baseline


def drift_findings(result: CaseResult, entry: dict[str, Any], factor: float, floor: float) -> list[str]:
    """Outputs whose max_abs grew beyond ``factor`` × max(baseline, floor·atol)."""
    findings = []
    atol = float(result.tolerance.get("atol") or entry.get("atol") or 0.0)
    for name, old in (entry.get("outputs") or {}).items():
        new = result.outputs.get(name)
        if new is None or "max_abs" not in old:
            continue
        reference = max(float(old["max_abs"]), floor * atol)
        if reference > 0 and new["max_abs"] > factor * reference:
            findings.append(
                f"numeric drift on {name}: max_abs {new['max_abs']:.3g} > {factor:g}× "
                f"baseline {float(old['max_abs']):.3g}"
            )
    return findings


def latency_regression(result: CaseResult, entry: dict[str, Any], threshold: float) -> str | None:
    """A reason when p50 rose beyond ``threshold`` and beyond both runs' noise band, else None."""
    if not result.latency or "p50_ms" not in result.latency or "p50_ms" not in entry:
        return None
    new_p50, old_p50 = float(result.latency["p50_ms"]), float(entry["p50_ms"])
    spreads = [
        max(0.0, float(run["p90_ms"]) - float(run["p50_ms"])) for run in (result.latency, entry) if "p90_ms" in run
    ]
    noise = max(spreads, default=0.0)
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
        result.baseline = {"path": baseline.path, "entry": entry, "findings": findings}
        for finding in findings:
            result.fail(finding, "baseline")
