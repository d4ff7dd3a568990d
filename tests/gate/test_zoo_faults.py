"""Faults injected into *optimized* zoo models (dynamo export): the gate fails each and names the module or
functional op (a fault the outputs hide: tests/numerics/test_masked_divergence.py).

One gate invocation (local executor) for all cases, so torch/ORT start-up is paid once.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from normfold.exporter import export
from normfold.exporter.provenance import module_path
from normfold.fusers import optimize
from normfold.gate import config_from_dict, run_gate
from normfold.models.loader import load_model
from normfold.models.zoo import PreNormTransformerBlock


def _optimized(name: str, tmp: Path) -> onnx.ModelProto:
    raw = export(load_model(f"zoo:{name}"), None, tmp / f"{name}.onnx").path
    optimize(raw, tmp / f"{name}.opt.onnx")
    return onnx.load(str(tmp / f"{name}.opt.onnx"))


def _node(model: onnx.ModelProto, op_type: str, module: str | None = None) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type == op_type and (module is None or module_path(n) == module))


def _init(model: onnx.ModelProto, name: str) -> tuple[onnx.TensorProto, np.ndarray]:
    tensor = next(t for t in model.graph.initializer if t.name == name)
    return tensor, numpy_helper.to_array(tensor).copy()


def _set(tensor: onnx.TensorProto, values: np.ndarray) -> None:
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))


def scaled_weight(m: onnx.ModelProto) -> str:
    """mobilenet_dw's first conv (its BN folded in) ×1.01: global average pooling hides it at the output."""
    conv = _node(m, "Conv")
    tensor, w = _init(m, conv.input[1])
    _set(tensor, w * np.float32(1.01))
    return module_path(conv) or ""


def swapped_activation(m: onnx.ModelProto) -> str:
    """The first ReLU6 (Clip 0..6) becomes LeakyReLU."""
    clip = _node(m, "Clip")
    clip.op_type, clip.input[:] = "LeakyRelu", clip.input[:1]
    clip.attribute.extend([helper.make_attribute("alpha", 0.1)])
    return module_path(clip) or ""


def changed_functional(m: onnx.ModelProto) -> str:
    """The residual ``x = x + attn`` in the transformer block's own forward becomes a Sub."""
    add = _node(m, "Add", "")
    add.op_type = "Sub"
    lines, start = inspect.getsourcelines(PreNormTransformerBlock.forward)
    line = start + next(k for k, text in enumerate(lines) if "x = x + attn" in text)
    return f"<root>: Tensor.add @ zoo.py:{line}"


def changed_eps(m: onnx.ModelProto) -> str:
    ln = _node(m, "LayerNormalization")
    next(a for a in ln.attribute if a.name == "epsilon").f = 1e-2
    return module_path(ln) or ""


def swapped_channels(m: onnx.ModelProto) -> str:
    conv = _node(m, "Conv", "layer1.bn1")
    tensor, w = _init(m, conv.input[1])
    w[[0, 1]] = w[[1, 0]]
    _set(tensor, w)
    return "layer1.bn1"


def dropped_bias(m: onnx.ModelProto) -> str:
    conv = _node(m, "Conv", "layer2.bn2")
    assert len(conv.input) == 3  # the folded BN gave it a bias
    del conv.input[2]
    return "layer2.bn2"


FAULTS: dict[str, tuple[str, Callable[[onnx.ModelProto], str]]] = {
    "scaled_weight": ("mobilenet_dw", scaled_weight),
    "swapped_activation": ("mobilenet_dw", swapped_activation),
    "changed_functional": ("transformer_block", changed_functional),
    "changed_eps": ("transformer_block", changed_eps),
    "swapped_channels": ("resnet_basic", swapped_channels),
    "dropped_bias": ("resnet_basic", dropped_bias),
}


@pytest.fixture(scope="module")
def faulty_gate(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("zoo_faults")
    clean = {name: _optimized(name, tmp) for name in {zoo for zoo, _ in FAULTS.values()}}
    expected, models = {}, []
    for fault, (zoo, inject) in FAULTS.items():
        model = onnx.ModelProto()
        model.CopyFrom(clean[zoo])
        expected[fault] = inject(model)
        onnx.save(model, str(tmp / f"{fault}.onnx"))
        models.append({"name": fault, "ref": f"zoo:{zoo}", "onnx": str(tmp / f"{fault}.onnx")})
    models += [{"name": f"clean_{z}", "ref": f"zoo:{z}", "onnx": str(tmp / f"{z}.opt.onnx")} for z in sorted(clean)]
    report = run_gate(config_from_dict({"models": models}, source="zoo-faults", base_dir=tmp), executor="local")
    return report, expected


@pytest.mark.parametrize("fault", FAULTS)
def test_the_gate_fails_and_names_the_fault(faulty_gate, fault: str) -> None:
    report, expected = faulty_gate
    case = next(c for c in report.cases if c.model == fault)
    assert case.status == "failed" and case.stage == "compare", (case.status, case.reason)
    assert case.first_divergence is not None, case.reason
    assert case.first_divergence is not None
    assert case.first_divergence.name == expected[fault], case.first_divergence.explanation
    assert case.reason.startswith(f"first divergent layer: {expected[fault]} (")


def test_clean_optimized_models_pass(faulty_gate) -> None:
    report, _ = faulty_gate
    for case in (c for c in report.cases if c.model.startswith("clean_")):
        assert case.status == "passed", (case.model, case.reason)
        assert case.layers is not None and case.layers.counts["failed"] == 0
