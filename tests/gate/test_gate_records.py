"""Case results stay typed across pickling (worker processes, Ray) and JSON only at the file boundary."""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from normfold.gate.baseline import Baseline, load_baseline, update_baseline
from normfold.gate.cases import CaseResult, CaseSpec
from normfold.gate.config import CaseSettings
from normfold.gate.records import (
    BaselineCheck,
    BaselineEntry,
    CaseLatency,
    LatencyConfirm,
    LatencyReference,
    OptimizeSummary,
    OutputError,
    Windows,
)
from normfold.io import json_text
from normfold.numerics.layer_report import LayerReport, LayerResult
from normfold.numerics.metrics import compare_tensors
from normfold.numerics.tolerances import Tolerance

#: Written by main's gate (before the typed records) with ``--update-baseline``: bench and per-layer on.
MAIN_BASELINE = Path(__file__).with_name("data") / "baseline_v1_main.json"
#: One case of the JSON report main's gate wrote against that baseline (latency interleaved, layers, optimize).
MAIN_REPORT_CASE = Path(__file__).with_name("data") / "report_case_v1_main.json"


def _full_result() -> CaseResult:
    tol = Tolerance(atol=1e-5, rtol=1e-4)
    y = compare_tensors("y", np.array([1.0, 2.5], np.float32), np.array([1.0, 2.0], np.float32), tol)
    fc = LayerResult("fc", "fc", "Linear", 0, 0, 0, 1, "fail", onnx_node="gemm_0", tolerance=tol, metrics=y)
    layers = LayerReport("ort-cpu", "/m.onnx", tol, [fc], functional_calls=2, functional_matched=1)
    layers.outputs["y"] = np.zeros(3)  # the run's tensors: carried by numerics, not by a case
    result = CaseResult("m[ort-cpu-fp32]", "m", "ort-cpu", "fp32", "passed", notes=["a note"], duration_s=1.5)
    result.tolerance, result.outputs = tol, {"y": y}
    result.layers = dataclasses.replace(layers, outputs={})
    result.first_divergence = layers.first_divergence
    result.optimize = OptimizeSummary("ort-cpu", 2, {"Conv": 1, "BatchNormalization": 1}, {"Conv": 1}, 0.05)
    windows = Windows(3, [0.5, 0.51, 0.5], True, 0.1, 0.02)
    confirm = LatencyConfirm("interleaved with the baseline artifact", rounds=8, ratio=1.01, low_quartile=0.99)
    result.latency = CaseLatency(0.5, 0.6, 0.4, 0.9, 0.52, 0.05, 40, 1, windows, "noise", confirm=confirm, ratio=1.01)
    entry = BaselineEntry({"y": OutputError(0.5, 0.25, 0.2)}, atol=1e-5, p50_ms=0.49, layers={"fc": 0.5})
    result.baseline = BaselineCheck("/b.json", entry, ["numeric drift on y"])
    result.fail("numeric drift on y", "baseline")
    return result


def test_a_full_case_result_pickles_typed_and_round_trips_its_json() -> None:
    result = _full_result()
    back = pickle.loads(pickle.dumps(result))
    assert back == result
    assert back.layers is not None and back.layers.first_divergence == result.first_divergence
    assert back.latency is not None and back.latency.confirm is not None and back.latency.confirm.ratio == 1.01
    data = result.to_dict()
    assert data["outputs"]["y"]["max_abs"] == 0.5 and data["latency"]["verdict"] == "noise"
    assert data["layers"]["first_divergence"]["module"] == "fc" and data["optimize"]["available"] is True
    assert data["status"] == "failed" and data["passed"] is False
    again = CaseResult.from_dict(json.loads(json_text(data)))  # through the file's strict JSON
    assert again == result and again.to_dict() == data


def test_non_finite_metrics_come_back_as_floats_from_the_strict_json() -> None:
    result = _full_result()
    result.outputs["y"] = dataclasses.replace(result.outputs["y"], max_rel=float("inf"), cosine=float("nan"))
    data = json.loads(json_text(result.to_dict()))
    assert data["outputs"]["y"]["max_rel"] == "inf"
    back = CaseResult.from_dict(data).outputs["y"]
    assert back.max_rel == float("inf") and np.isnan(back.cosine) and back.name == "y"


def test_a_skipped_case_keeps_its_empty_tolerance_in_json() -> None:
    skipped = CaseResult("m[ort-cuda-fp32]", "m", "ort-cuda", "fp32", "skipped")
    assert skipped.tolerance is None and skipped.to_dict()["tolerance"] == {}
    assert CaseResult.from_dict(skipped.to_dict()) == skipped


def test_a_case_spec_pickles_with_its_settings_and_latency_reference() -> None:
    spec = CaseSpec(
        "m[ort-cpu-fp32]",
        "m",
        "zoo:m",
        "ort-cpu",
        "fp32",
        CaseSettings(timeout_s=5.0, bench=True),
        latency_baseline=LatencyReference(0.5, 0.1, 0.6, "/b-artifacts/m.onnx"),
    )
    back = pickle.loads(pickle.dumps(spec))
    assert back == spec and back.timeout_s == 5.0 and back.settings.bench


def test_a_baseline_written_by_main_still_loads_and_writes_back_the_same(tmp_path: Path) -> None:
    baseline = load_baseline(MAIN_BASELINE)
    assert baseline is not None
    entry = baseline.cases["ln[ort-cpu-fp32]"]
    assert entry.p50_ms is not None and entry.p90_ms is not None and entry.atol == 1e-5
    assert entry.artifact == "base-artifacts/ln_ort-cpu-fp32_.onnx"
    assert entry.layers and all(isinstance(v, float) for v in entry.layers.values())
    (output,) = entry.outputs.values()
    assert output.max_abs >= 0 and output.rel_l2 is not None
    assert entry.latency_reference(0.1) == LatencyReference(entry.p50_ms, 0.1, entry.p90_ms, entry.artifact)
    on_disk = json.loads(MAIN_BASELINE.read_text())
    assert baseline.to_dict() == on_disk  # the typed form is exactly the file's form
    copy = tmp_path / "base.json"
    shutil.copy(MAIN_BASELINE, copy)
    previous = load_baseline(copy)
    assert update_baseline([], copy, previous).cases == baseline.cases
    assert json.loads(copy.read_text()) == on_disk
    assert Baseline.from_dict(on_disk).cases == baseline.cases


def test_a_report_case_written_by_main_reads_back_typed_and_unchanged() -> None:
    data = json.loads(MAIN_REPORT_CASE.read_text())
    case = CaseResult.from_dict(data)
    assert case.passed and case.tolerance == Tolerance(atol=1e-5, rtol=1e-4)
    assert case.layers is not None and [row.name for row in case.layers.layers][-1] == "<root>"
    assert case.latency is not None and case.latency.confirm is not None and case.latency.verdict == "noise"
    assert case.optimize is not None and case.optimize.target == "ort-cpu"
    assert case.baseline is not None and case.baseline.entry.p50_ms is not None
    assert _keeps(data, case.to_dict())  # every field main wrote survives; newer fields are only added


def _keeps(old: Any, new: Any) -> bool:
    """``new`` holds everything ``old`` holds: equal leaves, same-length lists, dict keys a superset."""
    if isinstance(old, dict):
        return isinstance(new, dict) and all(k in new and _keeps(v, new[k]) for k, v in old.items())
    if isinstance(old, list):
        return isinstance(new, list) and len(old) == len(new) and all(map(_keeps, old, new))
    return bool(old == new)


def test_keeps_spots_a_lost_or_changed_field() -> None:
    old = {"a": 1, "b": [{"c": 2}]}
    assert _keeps(old, {"a": 1, "b": [{"c": 2, "d": 3}], "e": 4})
    assert not _keeps(old, {"a": 1, "b": [{"c": 3}]}) and not _keeps(old, {"b": [{"c": 2}]})
