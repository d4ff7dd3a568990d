"""Every executor gives the same verdicts; a crash or a hang is that case's error, never the gate's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest

from normfold.exporter import export
from normfold.gate import ModelConfig, config_from_dict, run_gate
from normfold.gate.executors import describe_exit
from normfold.models.loader import load_model

GATE_MODELS = Path(__file__).with_name("gate_models.py")
TS = {"exporter": "torchscript", "opset": 17}


@pytest.fixture(scope="module")
def mixed_config(tmp_path_factory: pytest.TempPathFactory):
    """One passing, one failing (swapped channels), one skipped (GPU backend) and one per-output case."""
    tmp = tmp_path_factory.mktemp("executors")
    bad = tmp / "swapped.onnx"
    export(load_model("zoo:conv1d_bn"), None, bad, opset=17, exporter="torchscript")
    model = onnx.load(str(bad))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    tensor = next(t for t in model.graph.initializer if t.name == conv.input[1])
    w = onnx.numpy_helper.to_array(tensor).copy()
    w[[0, 1]] = w[[1, 0]]
    tensor.CopyFrom(onnx.numpy_helper.from_array(w, tensor.name))
    onnx.save(model, str(bad))
    ln_output = export(load_model(f"{GATE_MODELS}:ln_net"), None, tmp / "ln.onnx", **TS).output_names[0]
    data = {
        "defaults": {**TS, "backends": ["ort-cpu"]},
        "models": [
            {"name": "good", "ref": "zoo:conv1d_bn", "backends": ["ort-cpu", "ort-cuda"]},
            {"name": "swapped", "ref": "zoo:conv1d_bn", "onnx": "swapped.onnx"},
            {"name": "ln", "ref": f"{GATE_MODELS}:ln_net", "outputs": {ln_output: {"atol": 1e-3}}},
        ],
    }
    return config_from_dict(data, source="mixed", base_dir=tmp)


def _verdicts(report) -> dict[str, str]:
    return {c.case_id: c.status for c in report.cases}


def _ort_cuda_runs_here() -> bool:
    from normfold.runtime.registry import get_backend

    return get_backend("ort-cuda").probe() is None


def _expected() -> dict[str, str]:
    return {
        "good[ort-cpu-fp32]": "passed",
        "good[ort-cuda-fp32]": "passed" if _ort_cuda_runs_here() else "skipped",
        "swapped[ort-cpu-fp32]": "failed",
        "ln[ort-cpu-fp32]": "passed",
    }


def test_local_and_process_executors_give_the_same_verdicts(mixed_config) -> None:
    local = run_gate(mixed_config, executor="local")
    assert _verdicts(local) == _expected()
    ln = next(c for c in local.cases if c.model == "ln")
    assert [m.atol for m in ln.outputs.values()] == [1e-3]  # the per-output tolerance was applied
    # The process run also gets a case that segfaults and one that hangs: each is that case's error,
    # and the gate goes on (one run, so worker start-up is paid once).
    faulty = mixed_config.model_copy(deep=True)
    faulty.models = [
        *faulty.models,
        ModelConfig(name="segfault", ref=f"{GATE_MODELS}:crash"),
        ModelConfig(name="hang", ref=f"{GATE_MODELS}:hang", timeout_s=2),
    ]
    process = run_gate(faulty, executor="process", jobs=2)
    by_id = {c.case_id: c for c in process.cases}
    assert {k: by_id[k].status for k in _expected()} == _expected()
    for a in local.cases:
        assert by_id[a.case_id].max_abs == a.max_abs  # same inputs, same files, same numbers
    segfault, hang = by_id["segfault[ort-cpu-fp32]"], by_id["hang[ort-cpu-fp32]"]
    assert segfault.status == "error" and "SIGSEGV" in segfault.reason
    assert "gate_models.py" in segfault.reason and "in crash" in segfault.reason  # faulthandler's frames
    assert hang.status == "error" and "timed out after 2 s" in hang.reason
    assert list(by_id)[-2:] == ["segfault[ort-cpu-fp32]", "hang[ort-cpu-fp32]"]  # results keep config order
    assert not process.passed


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install 'normfold[ray]')"
)
def test_ray_executor_gives_the_same_verdicts(mixed_config) -> None:
    ray_report = run_gate(mixed_config, executor="ray", jobs=2)
    assert ray_report.executor == "ray"
    assert _verdicts(ray_report) == _expected()
    assert "swapped[ort-cpu-fp32]" in {c.case_id for c in ray_report.failing}


def test_describe_exit_names_signals() -> None:
    assert "SIGSEGV" in describe_exit(-11)
    assert "out-of-memory" in describe_exit(-9)
    assert describe_exit(3) == "exited with code 3"


def test_required_backend_absent_fails_instead_of_skipping(tmp_path: Path) -> None:
    from normfold.runtime.registry import get_backend

    if get_backend("ort-cuda").probe() is None:
        pytest.skip("ort-cuda runs here, so its absence cannot be tested")
    data = {"defaults": {**TS, "backends": ["ort-cuda"]}, "models": [{"ref": f"{GATE_MODELS}:ln_net"}]}
    config = config_from_dict(data, base_dir=tmp_path)
    skipped = run_gate(config, executor="local")
    assert [c.status for c in skipped.cases] == ["skipped"]
    assert "ort-cuda" in skipped.cases[0].reason
    assert not skipped.passed  # nothing ran: a skip is never a pass
    required = run_gate(config, executor="local", require=["ort-cuda"])
    assert [c.status for c in required.cases] == ["failed"]
    assert required.cases[0].reason.startswith("required backend unavailable")


def test_npz_inputs_reach_both_sides(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", x=np.full((2, 8, 16), 0.25, dtype=np.float32))
    data = {"defaults": TS, "models": [{"ref": f"{GATE_MODELS}:ln_net", "inputs_npz": "x.npz"}]}
    report = run_gate(config_from_dict(data, base_dir=tmp_path), executor="local")
    assert report.cases[0].status == "passed", report.cases[0].reason
    assert report.cases[0].input_source == f"npz {tmp_path / 'x.npz'}"


def test_tolerance_for_an_output_the_model_lacks_is_an_error(tmp_path: Path) -> None:
    data = {"defaults": TS, "models": [{"ref": f"{GATE_MODELS}:ln_net", "outputs": {"logits": {"atol": 1}}}]}
    case = run_gate(config_from_dict(data, base_dir=tmp_path), executor="local").cases[0]
    assert case.status == "error"
    assert "['logits']" in case.reason and "ONNX outputs are" in case.reason
