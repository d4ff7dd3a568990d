"""Case results stay typed across pickling (worker processes, Ray) and their JSON form is unchanged."""

from __future__ import annotations

import pickle

import numpy as np

from normfold.gate.cases import CaseResult
from normfold.gate.records import Divergence, OutputMetrics
from normfold.numerics.metrics import compare_tensors
from normfold.numerics.tolerances import Tolerance


def test_a_case_result_pickles_typed_and_renders_the_metrics_json_unchanged() -> None:
    tol = Tolerance(atol=1e-5, rtol=1e-4)
    metrics = compare_tensors("y", np.array([1.0, 2.5], np.float32), np.array([1.0, 2.0], np.float32), tol)
    result = CaseResult("m[ort-cpu-fp32]", "m", "ort-cpu", "fp32", "passed")
    result.tolerance = tol
    result.outputs = {"y": OutputMetrics.of(metrics)}
    result.first_divergence = {"module": "fc", "name": "fc", "max_abs": 0.5, "explanation": "fc moved"}

    back = pickle.loads(pickle.dumps(result))

    assert isinstance(back.outputs["y"], OutputMetrics) and isinstance(back.first_divergence, Divergence)
    assert back.tolerance == tol.to_dict() and back.outputs["y"].max_abs == 0.5 and not back.outputs["y"].passed
    assert back.to_dict()["outputs"]["y"] == metrics.to_dict()
    assert back.to_dict() == result.to_dict()
    assert back.first_divergence.describe() == "first divergent layer: fc (max_abs=0.5)"


def test_a_skipped_case_keeps_its_empty_tolerance_in_json() -> None:
    skipped = CaseResult("m[ort-cuda-fp32]", "m", "ort-cuda", "fp32", "skipped")
    assert skipped.tolerance is None and skipped.to_dict()["tolerance"] == {}
    assert CaseResult.from_dict(skipped.to_dict()).to_dict() == skipped.to_dict()
