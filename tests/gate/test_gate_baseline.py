"""Baselines: --update-baseline stores metrics; later runs flag numeric drift and noise-aware latency regressions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from normfold.errors import ConfigError
from normfold.gate import config_from_dict, run_gate
from normfold.gate.baseline import drift_findings, latency_regression, load_baseline
from normfold.gate.cases import CaseResult
from normfold.gate.records import BaselineEntry, CaseLatency, OutputError
from normfold.numerics.tolerances import Tolerance
from tests.gate.typed_results import metrics

GATE_MODELS = Path(__file__).with_name("gate_models.py")


def _result(max_abs: float, p50: float | None = None, p90: float | None = None) -> CaseResult:
    """A passing case measured without a baseline at hand (its latency verdict is ``no baseline``)."""
    r = CaseResult("m[ort-cpu-fp32]", "m", "ort-cpu", "fp32", "passed")
    r.outputs = {"y": metrics(max_abs)}
    r.tolerance = Tolerance(atol=1e-5, rtol=1e-4)
    if p50 is not None:
        p90 = p50 if p90 is None else p90
        r.latency = CaseLatency(p50, p90, p50, p90, p50, 0.0, iterations=30, threads=1)
    return r


def test_drift_beyond_the_factor_is_flagged_and_noise_below_the_floor_is_not() -> None:
    entry = BaselineEntry({"y": OutputError(2e-6)})
    assert drift_findings(_result(3e-6), entry, factor=2.0, floor=0.1) == []
    (finding,) = drift_findings(_result(5e-6), entry, factor=2.0, floor=0.1)
    assert finding.startswith("numeric drift on y: max_abs 5e-06 > 2× baseline 2e-06")
    tiny = BaselineEntry({"y": OutputError(1e-8)})
    assert drift_findings(_result(1e-7), tiny, factor=2.0, floor=0.1) == []  # under 0.1·atol: rounding noise
    assert drift_findings(_result(1e-7), tiny, factor=2.0, floor=0.0) != []


@pytest.mark.parametrize(
    ("new", "old", "regressed"),
    [
        ((1.30, 1.35), (1.00, 1.05), True),  # +30%, spreads 0.05: real
        ((1.05, 1.10), (1.00, 1.05), False),  # +5%: under the 10% threshold
        ((1.30, 1.90), (1.00, 1.05), False),  # +30% but this run's spread is 0.6 ms: noise
        ((1.30, 1.35), (1.00, 1.50), False),  # the baseline run was that noisy
        ((0.80, 0.85), (1.00, 1.05), False),  # faster is never a regression
    ],
)
def test_latency_regression_is_noise_aware(new: tuple, old: tuple, regressed: bool) -> None:
    entry = BaselineEntry(p50_ms=old[0], p90_ms=old[1])
    reason = latency_regression(_result(1e-7, *new), entry, threshold=0.10)
    assert (reason is not None) == regressed
    if regressed:
        assert reason.startswith("latency regression: p50 1.300 ms vs baseline 1.000 ms (+30%")


def test_latency_without_measurements_is_not_judged() -> None:
    assert latency_regression(_result(1e-7), BaselineEntry(p50_ms=1.0), threshold=0.1) is None
    assert latency_regression(_result(1e-7, 5.0), BaselineEntry(), threshold=0.1) is None


def test_update_then_check_against_the_baseline(tmp_path: Path) -> None:
    data = {
        "baseline": "base.json",
        "drift_floor": 0.0,
        "defaults": {"exporter": "torchscript", "opset": 17},
        "models": [{"name": "ln", "ref": f"{GATE_MODELS}:ln_net"}],
    }
    config = config_from_dict(data, base_dir=tmp_path)
    first = run_gate(config, executor="local")
    assert first.passed and any("no baseline at" in n for n in first.notes)
    stored = run_gate(config, executor="local", update_baseline_file=True)
    assert stored.baseline_updated
    baseline = load_baseline(tmp_path / "base.json")
    entry = baseline.cases["ln[ort-cpu-fp32]"]
    (output,) = entry.outputs.values()
    assert output.max_abs == stored.cases[0].max_abs
    assert entry.layers and set(entry.layers) <= {row.name for row in stored.cases[0].layers.layers}
    again = run_gate(config, executor="local")
    assert again.passed and again.cases[0].baseline is not None and again.cases[0].baseline.findings == []
    # Pretend the last release was 1000× more accurate: today's error is now drift.
    raw = json.loads((tmp_path / "base.json").read_text())
    for out in raw["cases"]["ln[ort-cpu-fp32]"]["outputs"].values():
        out["max_abs"] /= 1000
    (tmp_path / "base.json").write_text(json.dumps(raw))
    drifted = run_gate(config, executor="local")
    case = drifted.cases[0]
    assert case.status == "failed" and case.stage == "baseline"
    assert case.reason.startswith("numeric drift on ")
    assert not drifted.passed


def test_a_corrupt_baseline_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "b.json").write_text("{not json")
    with pytest.raises(ConfigError, match="rerun with --update-baseline"):
        load_baseline(tmp_path / "b.json")
    (tmp_path / "b.json").write_text('{"version": 99}')
    with pytest.raises(ConfigError, match="not a normfold baseline"):
        load_baseline(tmp_path / "b.json")
    assert load_baseline(tmp_path / "absent.json") is None


def test_latency_budget_fails_the_case_or_says_why_it_was_not_judged(tmp_path: Path) -> None:
    import importlib

    bench_available = hasattr(importlib.import_module("normfold.bench"), "benchmark")
    data = {
        "defaults": {"exporter": "torchscript", "opset": 17, "bench_iters": 5, "bench_warmup": 1},
        "models": [
            {"name": "tight", "ref": f"{GATE_MODELS}:ln_net", "latency_budget_ms": {"ort-cpu": 1e-6}},
            {"name": "loose", "ref": f"{GATE_MODELS}:ln_net", "latency_budget_ms": {"ort-cpu": 60_000}},
        ],
    }
    tight, loose = run_gate(config_from_dict(data, base_dir=tmp_path), executor="local").cases
    if bench_available:
        assert tight.status == "failed" and tight.stage == "bench"
        assert "exceeds the budget 1e-06 ms" in tight.reason
        assert loose.status == "passed" and loose.latency is not None and loose.latency.p50_ms > 0
        assert loose.latency.budget_ms == 60_000
    else:
        for case in (tight, loose):
            assert case.status == "passed" and case.latency is None
            assert any("latency not judged" in n for n in case.notes)
