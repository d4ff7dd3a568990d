"""A failing case costs one eager run and one backend session, whatever it judges.

Counted on the real thing: a global forward hook counts calls of the model's root module, and every
ONNX Runtime session built goes through a counting wrapper around ``InferenceSession.__init__`` that
calls the real one.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch

from normfold.exporter import export
from normfold.gate.cases import CaseSpec, probe_reason, run_case
from normfold.gate.config import CaseSettings
from normfold.models.loader import load_model

GATE_MODELS = Path(__file__).with_name("gate_models.py")


@pytest.fixture
def wrong_eps(tmp_path: Path) -> Path:
    path = tmp_path / "wrong_eps.onnx"
    export(load_model(f"{GATE_MODELS}:ln_net"), None, path, opset=17, exporter="torchscript")
    model = onnx.load(str(path))
    node = next(n for n in model.graph.node if n.op_type == "LayerNormalization")
    next(a for a in node.attribute if a.name == "epsilon").f = 1e-3
    onnx.save(model, str(path))
    return path


def test_a_failing_case_runs_eager_once_and_one_session(wrong_eps: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert probe_reason("ort-cpu", "fp32") == ""  # the availability probe is cached per process
    sessions: list[str] = []
    real_init = ort.InferenceSession.__init__

    def counting_init(self, path_or_bytes, *args, **kwargs):  # type: ignore[no-untyped-def]
        sessions.append(str(path_or_bytes)[:80])
        real_init(self, path_or_bytes, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "__init__", counting_init)
    forwards: list[str] = []

    def count(module: torch.nn.Module, args: object, output: object) -> None:
        if type(module).__name__ == "LnNet":
            forwards.append("LnNet")

    output = onnx.load(str(wrong_eps)).graph.output[0].name
    # A per-output tolerance group used to cost one more eager run and session of its own.
    settings = CaseSettings(outputs={output: {"atol": 1e-4}})
    spec = CaseSpec("c", "wrong_eps", f"{GATE_MODELS}:ln_net", "ort-cpu", "fp32", settings, onnx=str(wrong_eps))
    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        result = run_case(spec)
    finally:
        handle.remove()
    assert result.status == "failed" and result.first_divergence is not None
    assert [m.atol for m in result.outputs.values()] == [1e-4]  # the per-output tolerance was applied
    assert result.first_divergence.module == "norm"
    assert len(forwards) == 1, forwards  # one eager run serves outputs and layers
    assert len(sessions) == 1, sessions  # one backend run: the instrumented copy gives outputs too
