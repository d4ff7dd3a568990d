"""Fault injection: deliberately wrong models and graph edits must each FAIL the gate at default
tolerances, and the clean models beside them must pass (zero false failures).

All cases run in one gate invocation (local executor) so that torch/ORT start-up is paid once.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from normfold.exporter import export
from normfold.gate import config_from_dict, run_gate
from normfold.models.loader import load_model
from normfold.numerics.tolerances import Tolerance

GATE_MODELS = Path(__file__).with_name("gate_models.py")


def _ref(factory: str) -> str:
    return f"{GATE_MODELS}:{factory}"


def _export_ts(ref: str, path: Path) -> onnx.ModelProto:
    export(load_model(ref), None, path, opset=17, exporter="torchscript")
    return onnx.load(str(path))


def _initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def _wrong_eps(tmp: Path) -> Path:
    """LayerNormalization epsilon 1e-5 → 1e-3 in the shipped file."""
    path = tmp / "wrong_eps.onnx"
    model = _export_ts(_ref("ln_net"), path)
    node = next(n for n in model.graph.node if n.op_type == "LayerNormalization")
    attr = next(a for a in node.attribute if a.name == "epsilon")
    assert abs(attr.f - 1e-5) < 1e-9
    attr.f = 1e-3
    onnx.save(model, str(path))
    return path


def _unbiased_ln(tmp: Path) -> Path:
    """The artifact was exported from a hand-written "LayerNorm" with unbiased variance."""
    path = tmp / "unbiased_ln.onnx"
    _export_ts(_ref("ln_net_unbiased"), path)
    return path


def _channel_swap(tmp: Path) -> Path:
    """Output channels 0 and 1 of the first Conv's (BN-folded) weight swapped."""
    path = tmp / "channel_swap.onnx"
    model = _export_ts("zoo:conv1d_bn", path)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    tensor = _initializer(model, conv.input[1])
    w = onnx.numpy_helper.to_array(tensor).copy()
    assert not np.allclose(w[0], w[1])
    w[[0, 1]] = w[[1, 0]]
    tensor.CopyFrom(onnx.numpy_helper.from_array(w, tensor.name))
    onnx.save(model, str(path))
    return path


def _dropped_bias(tmp: Path) -> Path:
    """The first Conv with a bias loses it."""
    path = tmp / "dropped_bias.onnx"
    model = _export_ts("zoo:conv1d_bn", path)
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and len(n.input) == 3)
    bias = onnx.numpy_helper.to_array(_initializer(model, conv.input[2]))
    assert np.abs(bias).max() > 1e-3
    del conv.input[2]
    onnx.save(model, str(path))
    return path


def _negative_inputs(tmp: Path) -> Path:
    """Inputs whose mean is negative: eager takes the branch the traced ONNX froze away."""
    path = tmp / "negative.npz"
    x = -(np.abs(np.random.default_rng(3).standard_normal((2, 16))) + 0.5).astype(np.float32)
    np.savez(path, x=x)
    return path


FAULTS = ("wrong_eps", "unbiased_ln", "channel_swap", "dropped_bias", "frozen_branch")
CLEAN = ("clean_conv1d_bn", "clean_transformer_block", "clean_ln_net", "clean_branchy")


@pytest.fixture(scope="module")
def fault_report(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("faults")
    ts = {"exporter": "torchscript", "opset": 17}
    models = [
        {"name": "wrong_eps", "ref": _ref("ln_net"), "onnx": str(_wrong_eps(tmp))},
        {"name": "unbiased_ln", "ref": _ref("ln_net"), "onnx": str(_unbiased_ln(tmp))},
        {"name": "channel_swap", "ref": "zoo:conv1d_bn", "onnx": str(_channel_swap(tmp))},
        {"name": "dropped_bias", "ref": "zoo:conv1d_bn", "onnx": str(_dropped_bias(tmp))},
        {"name": "frozen_branch", "ref": _ref("branchy"), "inputs_npz": str(_negative_inputs(tmp)), **ts},
        {"name": "clean_conv1d_bn", "ref": "zoo:conv1d_bn"},  # dynamo, the default exporter
        {"name": "clean_transformer_block", "ref": "zoo:transformer_block", **ts},
        {"name": "clean_ln_net", "ref": _ref("ln_net"), **ts},
        {"name": "clean_branchy", "ref": _ref("branchy"), **ts},
    ]
    config = config_from_dict({"models": models}, source="fault-suite", base_dir=tmp)
    return run_gate(config, executor="local", json_path=tmp / "faults.json")


@pytest.mark.parametrize("name", FAULTS)
def test_each_fault_fails_the_gate_at_default_tolerances(fault_report, name: str) -> None:
    case = next(c for c in fault_report.cases if c.model == name)
    assert case.status == "failed", (case.status, case.reason)
    assert case.stage == "compare"
    assert case.tolerance == Tolerance(atol=1e-5, rtol=1e-4, min_cosine=None, allow_nonfinite=False)
    assert "out of tolerance" in case.reason
    assert case.max_abs is not None and case.max_abs > 1e-4


@pytest.mark.parametrize("name", CLEAN)
def test_clean_models_pass_with_zero_false_failures(fault_report, name: str) -> None:
    case = next(c for c in fault_report.cases if c.model == name)
    assert case.status == "passed", (case.status, case.reason)
    assert case.max_abs is not None and case.max_abs < 1e-5


FIRST_DIVERGENT_MODULE = {
    "wrong_eps": "norm",
    "unbiased_ln": "norm",
    # conv1d_bn's BN "1": the TorchScript exporter folded it into Conv '/0/Conv', whose value is the BN's
    # output (compared there; the conv "0" is "fused into 1", and the explanation names both).
    "channel_swap": "1",
    "dropped_bias": "1",
    "frozen_branch": "fc",
}


@pytest.mark.parametrize("name", FAULTS)
def test_failures_name_the_first_divergent_layer(fault_report, name: str) -> None:
    case = next(c for c in fault_report.cases if c.model == name)
    if case.layers is None:  # a build without the per-layer diff says so instead
        assert any("per-layer diff" in note for note in case.notes), case.notes
        return
    assert case.first_divergence is not None
    assert case.first_divergence is not None and case.first_divergence.module == FIRST_DIVERGENT_MODULE[name]
    assert case.reason.startswith(f"first divergent layer: {FIRST_DIVERGENT_MODULE[name]} (")
    if name in ("channel_swap", "dropped_bias"):
        assert "ONNX node /0/Conv" in case.reason, case.reason
        assert "also computes 0 (fused into it)" in case.first_divergence.explanation


def test_fault_report_verdict_and_json(fault_report) -> None:
    assert not fault_report.passed
    assert fault_report.counts == {"passed": len(CLEAN), "failed": len(FAULTS), "error": 0, "skipped": 0}
    data = json.loads(Path(fault_report.written["json"]).read_text())
    assert data["passed"] is False
    assert {c["model"]: c["status"] for c in data["cases"]}["wrong_eps"] == "failed"


def test_clean_export_was_optimized_before_the_compare(fault_report) -> None:
    case = next(c for c in fault_report.cases if c.model == "clean_conv1d_bn")
    assert case.optimize is not None and case.optimize.applied > 0  # its BatchNorms were folded
    assert case.optimize.ops_after.get("BatchNormalization", 0) == 0
    assert case.optimize.target == case.backend == "ort-cpu"  # norms lowered for the case's backend
    assert case.optimize_summary().startswith("optimized: ")
