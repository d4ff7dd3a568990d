"""Latency verdicts that do not flake: stability windows, interleaved A/B, and the gate's confirm step.

Real calls, real ORT sessions, real files. Timing assertions use margins of 2x or more (a busy shared
machine must not fail them); the precise numbers are in benchmarks/gate_flakes.py.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from normfold.bench.measure import interleave, measure_until_stable
from normfold.errors import UsageError
from normfold.exporter import export
from normfold.gate import config_from_dict, run_gate
from normfold.models.loader import load_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from _slowdown import add_side_branch


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_a_steady_call_is_stable_within_few_windows() -> None:
    run = measure_until_stable(lambda: _spin(2e-4), window_s=0.05, stability=0.5)
    assert run.stable and 3 <= len(run.window_p50_ns) <= 12
    assert 1.5e5 < sorted(run.samples_ns)[len(run.samples_ns) // 2] < 2e6


def test_a_level_that_keeps_moving_is_reported_unstable() -> None:
    state = {"d": 1e-4}

    def growing() -> None:
        state["d"] *= 1.02  # +2% per call: each window's median sits far above the last one
        _spin(state["d"])

    run = measure_until_stable(growing, window_s=0.02, stability=0.05, max_windows=4, warmup_s=0.0)
    assert not run.stable and len(run.window_p50_ns) == 4 and run.spread > 0.05


def test_interleaving_measures_the_ratio_of_two_calls() -> None:
    ab = interleave(lambda: _spin(4e-4), lambda: _spin(1e-4), rounds=4, window_s=0.03)
    assert len(ab.ratios) == 4 and 2.0 < ab.ratio < 8.0 and ab.low > 1.5
    with pytest.raises(UsageError):
        interleave(lambda: None, lambda: None, rounds=1)


def test_the_gate_confirms_a_real_slowdown_and_passes_the_unchanged_model(tmp_path: Path) -> None:
    clean = export(load_model("zoo:mobilenet_dw"), None, tmp_path / "m.onnx", opset=17, exporter="torchscript").path
    slow = add_side_branch(clean, tmp_path / "slow.onnx", size=384, repeats=6)  # ≥ 2x on this model
    baseline = tmp_path / "baseline.json"

    def config(onnx: Path):
        entry = {"name": "m", "ref": "zoo:mobilenet_dw", "onnx": str(onnx), "bench": True}
        return config_from_dict({"baseline": str(baseline), "models": [entry]}, source="t", base_dir=tmp_path)

    stored = run_gate(config(clean), executor="local", update_baseline_file=True)
    assert stored.passed
    artifact = tmp_path / "baseline-artifacts" / "m_ort-cpu-fp32_.onnx"
    assert artifact.is_file()  # kept beside the baseline, so later runs can interleave with it

    same = run_gate(config(clean), executor="local").cases[0]
    assert same.status == "passed", same.reason
    assert same.latency is not None and same.latency.stability is not None and same.latency.confirm is not None
    assert same.latency.verdict in ("ok", "noise") and same.latency.stability.windows >= 3
    assert same.latency.confirm.method == "interleaved with the baseline artifact"

    slowed = run_gate(config(slow), executor="local").cases[0]
    assert slowed.status == "failed" and slowed.stage == "baseline"
    assert slowed.latency is not None and slowed.latency.ratio is not None
    assert slowed.latency.verdict == "regressed" and slowed.latency.ratio > 1.5
    assert slowed.reason.startswith("latency regression: p50 ") and "interleaved" in slowed.reason
    assert all(m.passed for m in slowed.outputs.values())  # the slowdown changes no number
