"""Noise-aware comparison of a bench run against a baseline JSON.

A p50 that moved is only called a regression when the move is both *large* and *real*:

* large: the relative change ``Δ = (p50_now − p50_base) / p50_base`` exceeds ``max_regression``;
* real: the shift ``p50_now − p50_base`` exceeds a noise band built from the spread of *both* runs.

Each run's median has a standard error estimated robustly from its median absolute deviation:
``σ ≈ 1.4826·MAD`` and ``SE(median) ≈ √(π/2)·σ/√n``. The shift of two independent medians has standard
error ``√(SE_base² + SE_now²)``; the noise band is ``z`` of those (``z = 3`` by default, so a pure-noise
shift crosses it about 0.3% of the time), but never less than ``MAD_base + MAD_now``, the two runs' typical
per-call jitter: many samples make the medians' sampling error tiny, yet a machine whose calls scatter by
X cannot show a shift smaller than X to be real; nor smaller than the *drift* either run showed (the range of
the medians of its ten consecutive blocks, ``drift_ms``), since load from other processes moves the whole
latency level for a while, which no per-call statistic sees. When a baseline has no MAD (written by another
tool), its IQR is used instead (``σ ≈ IQR/1.349``), and failing that its standard deviation.

Outcomes per (backend, batch size): ``regressed`` (large and real: the CLI exits 1), ``noise`` (large but
inside the noise band), ``improved`` (large and real, faster), ``unchanged``, ``new`` (not in the
baseline) and ``missing`` (in the baseline, not measured now).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from normfold.bench.stats import MAD_TO_SIGMA, median_standard_error
from normfold.errors import UsageError

if TYPE_CHECKING:
    from normfold.bench.report import BenchReport

DEFAULT_MAX_REGRESSION = 0.10
DEFAULT_Z = 3.0
IQR_TO_SIGMA = 1.349

_REQUIRED = ("backend", "batch_size", "p50_ms", "iterations")


def parse_fraction(text: str | float) -> float:
    """``"10%"`` → 0.10, ``"0.1"`` → 0.10, ``"10"`` → 0.10 (bare numbers ≥ 1 are read as percent)."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        raw = text.strip()
        percent = raw.endswith("%")
        try:
            value = float(raw.rstrip("%").strip())
        except ValueError:
            raise UsageError(
                f"--max-regression expects a percentage like 10% or a fraction like 0.1, got {text!r}"
            ) from None
        if percent or value >= 1.0:
            value /= 100.0
    if not (math.isfinite(value) and value >= 0):
        raise UsageError(f"--max-regression must be a non-negative percentage, got {text!r}")
    return value


def robust_sigma(row: Mapping[str, Any]) -> float:
    """A spread estimate for one result row: 1.4826·MAD, else IQR/1.349, else the standard deviation."""
    for key, scale in (("mad_ms", MAD_TO_SIGMA), ("iqr_ms", 1.0 / IQR_TO_SIGMA), ("std_ms", 1.0)):
        value = row.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value) and value >= 0:
            return float(value) * scale
    return 0.0


def median_se(row: Mapping[str, Any]) -> float:
    """Standard error of a row's p50, from its robust spread and iteration count."""
    n = int(row.get("iterations") or 0)
    return median_standard_error(robust_sigma(row), n)


def noise_band_ms(baseline: Mapping[str, Any], current: Mapping[str, Any], z: float = DEFAULT_Z) -> float:
    """How far two medians of pure noise plausibly drift apart.

    The largest of ``z·√(SE_base² + SE_now²)`` (sampling noise of the two medians), ``MAD_base + MAD_now``
    (the runs' typical jitter: a shift smaller than what a single call varies by within one run is not
    evidence of a slower model, whatever the sample count) and the larger ``drift_ms`` of the two (how far
    the median of one block of a run moved from another's: if the level wandered that much *within* a
    run, it can differ that much *between* runs).
    """
    sampling = z * math.hypot(median_se(baseline), median_se(current))
    jitter = (robust_sigma(baseline) + robust_sigma(current)) / MAD_TO_SIGMA
    drift = max(_nonneg(baseline.get("drift_ms")), _nonneg(current.get("drift_ms")))
    return max(sampling, jitter, drift)


def _nonneg(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) and value > 0 else 0.0


@dataclass(frozen=True)
class RegressionEntry:
    """How one (backend, batch size) moved relative to the baseline."""

    backend: str
    batch_size: int
    status: str
    baseline_p50_ms: float | None
    current_p50_ms: float | None
    shift_ms: float | None
    change: float | None
    noise_ms: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RegressionReport:
    """Every compared entry plus warnings (other CPU, other thread settings)."""

    baseline: str
    max_regression: float
    z: float
    entries: list[RegressionEntry] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def regressed(self) -> bool:
        return any(e.status == "regressed" for e in self.entries)

    def moved(self) -> list[RegressionEntry]:
        """Entries whose p50 moved beyond ``max_regression`` (real or noise), plus new and missing ones."""
        return [e for e in self.entries if e.status != "unchanged"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline,
            "max_regression": self.max_regression,
            "z": self.z,
            "regressed": self.regressed,
            "entries": [e.to_dict() for e in self.entries],
            "warnings": list(self.warnings),
        }


def classify(
    baseline: Mapping[str, Any], current: Mapping[str, Any], max_regression: float, z: float = DEFAULT_Z
) -> RegressionEntry:
    """Compare one baseline row with one current row (both in the ``results`` JSON form)."""
    base, now = float(baseline["p50_ms"]), float(current["p50_ms"])
    shift = now - base
    change = shift / base if base > 0 else math.inf if shift > 0 else 0.0
    noise = noise_band_ms(baseline, current, z)
    if change > max_regression:
        status = "regressed" if shift > noise else "noise"
    elif change < -max_regression:
        status = "improved" if -shift > noise else "noise"
    else:
        status = "unchanged"
    return RegressionEntry(
        backend=str(current["backend"]),
        batch_size=int(current["batch_size"]),
        status=status,
        baseline_p50_ms=base,
        current_p50_ms=now,
        shift_ms=shift,
        change=change,
        noise_ms=noise,
    )


def load_baseline(path: str | Path) -> dict[str, Any]:
    """Read a ``--json`` file written by an earlier run; malformed files raise :class:`UsageError`."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"baseline file not found: {p}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"baseline {p} is not readable JSON ({type(e).__name__}: {e})") from e
    rows = data.get("results") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise UsageError(f"baseline {p} has no 'results' list; expected the JSON written by normfold bench --json")
    for i, row in enumerate(rows):
        missing = [k for k in _REQUIRED if not isinstance(row, dict) or k not in row]
        if missing:
            raise UsageError(f"baseline {p}: results[{i}] lacks {', '.join(missing)}")
    return data


def _options_key(row: Mapping[str, Any]) -> dict[str, Any]:
    opts = row.get("options") or {}
    return {k: v for k, v in opts.items() if k in ("intra_op_threads", "torch_threads", "graph_optimization_level")}


def compare_rows(
    baseline_rows: Sequence[Mapping[str, Any]],
    current_rows: Sequence[Mapping[str, Any]],
    max_regression: float = DEFAULT_MAX_REGRESSION,
    z: float = DEFAULT_Z,
) -> tuple[list[RegressionEntry], list[str]]:
    """Match rows by (backend, batch size) and classify each; also warn where settings differ."""
    base_by_key = {(str(r["backend"]), int(r["batch_size"])): r for r in baseline_rows}
    entries: list[RegressionEntry] = []
    warnings: list[str] = []
    seen: set[tuple[str, int]] = set()
    for row in current_rows:
        key = (str(row["backend"]), int(row["batch_size"]))
        seen.add(key)
        base = base_by_key.get(key)
        if base is None:
            entries.append(RegressionEntry(key[0], key[1], "new", None, float(row["p50_ms"]), None, None, None))
            continue
        entries.append(classify(base, row, max_regression, z))
        if _options_key(base) != _options_key(row):
            warnings.append(
                f"{key[0]} batch {key[1]}: settings differ from the baseline "
                f"(baseline {_options_key(base)}, now {_options_key(row)})"
            )
    for key, base in base_by_key.items():
        if key not in seen:
            entries.append(RegressionEntry(key[0], key[1], "missing", float(base["p50_ms"]), None, None, None, None))
    return entries, warnings


def check_regression(
    report: BenchReport,
    baseline: str | Path | Mapping[str, Any],
    max_regression: float | str = DEFAULT_MAX_REGRESSION,
    z: float = DEFAULT_Z,
) -> RegressionReport:
    """Compare ``report`` with a baseline (a path to an earlier ``--json`` or its parsed dict)."""
    limit = parse_fraction(max_regression)
    if isinstance(baseline, Mapping):
        data, name = dict(baseline), "<dict>"
    else:
        data, name = load_baseline(baseline), str(baseline)
    entries, warnings = compare_rows(data["results"], [r.to_dict() for r in report.results], limit, z)
    base_cpu = (data.get("environment") or {}).get("cpu_model")
    now_cpu = report.environment.get("cpu_model")
    if base_cpu and now_cpu and base_cpu != now_cpu:
        warnings.insert(0, f"baseline was measured on a different CPU ({base_cpu!r}, now {now_cpu!r})")
    return RegressionReport(name, limit, z, entries, warnings)
