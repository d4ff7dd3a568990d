"""Per-layer numerics: fault localization on zoo models, no false alarms, and the matching rules.

Real torch export, real ONNX Runtime, real files. A fault is injected into one node of the (optimized)
ONNX file and the report must name the module that owns that node as the first divergence.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from normfold.exporter import export
from normfold.exporter.provenance import module_path
from normfold.fusers import optimize
from normfold.models.loader import LoadedModel, load_model
from normfold.numerics import compare
from normfold.numerics.layers import LayerReport, layer_tolerance
from normfold.numerics.tolerances import Tolerance

FAULT_MODELS = ("resnet_basic", "transformer_block", "unet_resblock", "lenet_custom_bn")


def _optimize(src: Path, dst: Path) -> Path:
    """normfold's own passes: BN folding moves the Conv's provenance onto the BN module."""
    optimize(src, dst)
    return dst


@pytest.fixture(scope="module")
def zoo_onnx(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[LoadedModel, Path]]:
    """Export (and optimize) a zoo model once per test module."""
    cache: dict[str, tuple[LoadedModel, Path]] = {}
    root = tmp_path_factory.mktemp("layers_zoo")

    def get(name: str) -> tuple[LoadedModel, Path]:
        if name not in cache:
            loaded = load_model(f"zoo:{name}")
            raw = root / f"{name}.onnx"
            export(loaded, None, raw)
            cache[name] = (loaded, _optimize(raw, root / f"{name}.opt.onnx"))
        return cache[name]

    return get


def _layers(loaded: LoadedModel, path: Path) -> LayerReport:
    report = compare(loaded, path, per_layer=True)
    layers = report.backends["ort-cpu"].layers
    assert isinstance(layers, LayerReport)
    return layers


# ---------------------------------------------------------------------------------------------------------
# Fault injection on the ONNX file


def _init(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    for t in model.graph.initializer:
        if t.name == name:
            return t
    raise LookupError(f"{name} is not an initializer")


def _set_init(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    _init(model, name).CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))


def _nth(model: onnx.ModelProto, op_types: tuple[str, ...], n: int) -> onnx.NodeProto:
    nodes = [node for node in model.graph.node if node.op_type in op_types]
    return nodes[n]


def scale_weight(model: onnx.ModelProto, n: int) -> onnx.NodeProto:
    """Scale the weights of the n-th Conv/Gemm by 1.01."""
    node = _nth(model, ("Conv", "Gemm"), n)
    w = numpy_helper.to_array(_init(model, node.input[1]))
    _set_init(model, node.input[1], w * 1.01)
    return node


def swap_bias(model: onnx.ModelProto, n: int) -> onnx.NodeProto:
    """Swap the smallest and largest channel of the bias of the n-th Conv/Gemm (a BN-folded bias once optimized)."""
    node = _nth(model, ("Conv", "Gemm"), n)
    b = numpy_helper.to_array(_init(model, node.input[2])).copy()
    lo, hi = int(b.argmin()), int(b.argmax())
    assert b[lo] != b[hi], f"the bias of {node.name} is constant (not BN-folded): swapping channels changes nothing"
    b[[lo, hi]] = b[[hi, lo]]
    _set_init(model, node.input[2], b)
    return node


def ln_epsilon(model: onnx.ModelProto, n: int) -> onnx.NodeProto:
    """Set the epsilon of the n-th LayerNormalization to 1e-1."""
    node = _nth(model, ("LayerNormalization",), n)
    for attr in node.attribute:
        if attr.name == "epsilon":
            attr.f = 0.1
            break
    else:
        node.attribute.append(onnx.helper.make_attribute("epsilon", 0.1))
    return node


def gn_scale(model: onnx.ModelProto, n: int) -> onnx.NodeProto:
    """Multiply one channel of the n-th GroupNormalization's scale by 1.05."""
    node = _nth(model, ("GroupNormalization",), n)
    s = numpy_helper.to_array(_init(model, node.input[1])).copy()
    s[3] *= 1.05
    _set_init(model, node.input[1], s)
    return node


# (model, fault, which node, the module that owns it in the optimized graph: a folded Conv/Gemm is its BN's)
FAULTS = [
    ("resnet_basic", scale_weight, 4, "layer2.bn1"),
    ("resnet_basic", swap_bias, 7, "layer3.bn1"),
    ("transformer_block", ln_epsilon, 1, "ln2"),
    ("unet_resblock", gn_scale, 1, "norm2"),
    ("unet_resblock", scale_weight, 0, "conv1"),
    ("lenet_custom_bn", swap_bias, 2, "10"),
    ("lenet_custom_bn", scale_weight, 1, "5"),
]


@pytest.mark.parametrize(("model_name", "fault", "n", "expected"), FAULTS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_injected_fault_is_localized_to_its_module(
    zoo_onnx: Callable[[str], tuple[LoadedModel, Path]],
    tmp_path: Path,
    model_name: str,
    fault: Callable[[onnx.ModelProto, int], onnx.NodeProto],
    n: int,
    expected: str,
) -> None:
    loaded, clean = zoo_onnx(model_name)
    model = onnx.load(str(clean))
    node = fault(model, n)
    owner = module_path(node)
    assert owner == expected, f"the faulty node {node.name} belongs to {owner!r}"
    faulty = tmp_path / "faulty.onnx"
    onnx.save(model, str(faulty))

    layers = _layers(loaded, faulty)
    first = layers.first_divergence
    assert first is not None, "the fault went unnoticed"
    assert first.module == owner, first.explanation
    assert first.onnx_node == node.name and first.op_type == node.op_type
    assert first.max_abs > first.atol
    before = [layer for layer in layers.layers if layer.order < first.order]
    assert all(layer.status != "fail" for layer in before)
    assert first.explanation.startswith(first.name)
    assert layers.to_dict()["first_divergence"]["module"] == owner


@pytest.mark.parametrize("model_name", FAULT_MODELS)
def test_no_fault_no_failing_layer(zoo_onnx: Callable[[str], tuple[LoadedModel, Path]], model_name: str) -> None:
    loaded, path = zoo_onnx(model_name)
    layers = _layers(loaded, path)
    assert layers.first_divergence is None
    assert layers.passed
    counts = layers.counts
    assert counts["failed"] == 0
    assert counts["matched"] >= 5
    assert layers.extra_outputs > 0
    for layer in layers.layers:
        assert layer.status in ("pass", "fused", "unmatched", "not_called")
        if layer.status == "unmatched":
            assert layer.reason and layer.reason_kind, layer.name
        if layer.status == "pass":
            assert layer.metrics is not None and layer.onnx_value and layer.op_type


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_name",
    ["lenet_bn", "mobilenet_dw", "convtranspose_decoder", "conv1d_bn", "groupnorm_handwritten", "instancenorm_style"],
)
def test_no_fault_rest_of_zoo(zoo_onnx: Callable[[str], tuple[LoadedModel, Path]], model_name: str) -> None:
    loaded, path = zoo_onnx(model_name)
    layers = _layers(loaded, path)
    assert layers.first_divergence is None, layers.first_divergence.explanation
    assert layers.counts["matched"] >= 3


def test_resnet_layers_in_execution_order_with_fused_convs(
    zoo_onnx: Callable[[str], tuple[LoadedModel, Path]],
) -> None:
    loaded, path = zoo_onnx("resnet_basic")
    layers = _layers(loaded, path)
    names = [layer.name for layer in layers.layers]
    # hooks fire when a call finishes: children before their block, the shared ReLU once per call
    assert names.index("layer1.conv1") < names.index("layer1.bn1") < names.index("layer1.relu#1")
    assert names.index("layer1.relu#2") < names.index("layer1") < names.index("layer2.conv1")
    assert names[-1] == "<root>"
    by_name = {layer.name: layer for layer in layers.layers}
    assert by_name["<root>"].onnx_value == onnx.load(str(path)).graph.output[0].name
    if path.name.endswith(".opt.onnx"):
        conv = by_name["layer2.conv1"]
        assert conv.status == "fused" and conv.fused_into == "layer2.bn1"
        assert by_name["layer2.bn1"].absorbed == ["layer2.conv1"]
        assert by_name["layer2.downsample.0"].fused_into == "layer2.downsample.1"


# ---------------------------------------------------------------------------------------------------------
# Matching rules on a purpose-built model


class _Pair(nn.Module):
    """Returns a tuple: exercises flattened outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.a(x)
        return y, y.flip(-1) * 2.0


class _Probe(nn.Module):
    """A shared activation called twice, an identity (Dropout), a tuple output and an unused module."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.act = nn.Tanh()
        self.drop = nn.Dropout(0.5)
        self.pair = _Pair()
        self.unused = nn.Linear(2, 2)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.act(self.inp(x)))
        p, q = self.pair(h)
        return self.out(self.act(p + q))


@pytest.fixture(scope="module")
def probe_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    module = _Probe().eval()
    path = tmp_path_factory.mktemp("probe") / "probe.onnx"
    export(module, (torch.randn(2, 4),), path)
    return module, path


def test_shared_module_identity_tuple_and_unused(probe_onnx: tuple[nn.Module, Path]) -> None:
    module, path = probe_onnx
    report = compare(module, path, (torch.randn(2, 4),), per_layer=True)
    layers = report.backends["ort-cpu"].layers
    by_name = {layer.name: layer for layer in layers.layers}
    assert {"act#1", "act#2", "pair[0]", "pair[1]", "drop", "unused"} <= set(by_name)
    assert by_name["act#1"].onnx_value != by_name["act#2"].onnx_value
    assert by_name["act#1"].status == by_name["act#2"].status == "pass"
    assert by_name["drop"].status == "pass" and "identity" in by_name["drop"].reason
    assert by_name["drop"].onnx_value == by_name["act#1"].onnx_value
    assert by_name["pair[0]"].status == by_name["pair[1]"].status == "pass"
    assert by_name["pair[0]"].onnx_value != by_name["pair[1]"].onnx_value
    assert by_name["drop"].alias_of == "act#1"
    assert by_name["unused"].status == "not_called" and by_name["unused"].reason_kind == "not called in forward"
    assert layers.counts["not_called"] == 1  # listed apart, not in the layer count
    assert layers.first_divergence is None


def test_probe_fault_in_second_call_of_shared_module(probe_onnx: tuple[nn.Module, Path], tmp_path: Path) -> None:
    module, path = probe_onnx
    model = onnx.load(str(path))
    gemm = _nth(model, ("Gemm", "MatMul"), 2)  # the output Linear, after the second Tanh
    faulty = tmp_path / "faulty.onnx"
    w = numpy_helper.to_array(_init(model, gemm.input[1]))
    _set_init(model, gemm.input[1], w * 1.01)
    onnx.save(model, str(faulty))
    layers = compare(module, faulty, (torch.randn(2, 4),), per_layer=True).backends["ort-cpu"].layers
    first = layers.first_divergence
    assert first is not None and first.module == "out" == module_path(gemm)
    assert "act#2" in first.explanation  # its input is named and matches eager


def test_layer_tolerance_scales_with_magnitude() -> None:
    tol = Tolerance(atol=1e-5, rtol=1e-4)
    small = layer_tolerance(tol, np.array([0.5, -1.0], dtype=np.float32))
    large = layer_tolerance(tol, np.array([50.0, -2.0, np.inf], dtype=np.float32))
    assert small.atol == pytest.approx(1e-5 + 1e-4)
    assert large.atol == pytest.approx(1e-5 + 1e-4 * 50.0)
    assert large.rtol == tol.rtol
    assert layer_tolerance(tol, np.zeros((0,), dtype=np.float32)).atol == tol.atol


def test_module_folded_into_its_parent_is_inlined(probe_onnx: tuple[nn.Module, Path], tmp_path: Path) -> None:
    """A pass that credits a child's node to its parent: the child is "inlined into a fused op", not lost."""
    from normfold.exporter.provenance import set_module_path

    module, path = probe_onnx
    model = onnx.load(str(path))
    gemm = next(n for n in model.graph.node if module_path(n) == "pair.a")
    set_module_path(gemm, "pair")
    restamped = tmp_path / "restamped.onnx"
    onnx.save(model, str(restamped))
    layers = compare(module, restamped, (torch.randn(2, 4),), per_layer=True).backends["ort-cpu"].layers
    by_name = {layer.name: layer for layer in layers.layers}
    child = by_name["pair.a"]
    assert child.status == "fused" and child.reason_kind == "inlined into a fused op"
    assert child.fused_into == "pair" and gemm.name in child.reason
    assert by_name["pair[0]"].status == "pass"  # the parent still carries the value, and it is compared
    assert layers.counts["unmatched"] == 0 and layers.counts["not_called"] == 1  # the never-called `unused`


def test_torchscript_export_fusions_are_credited_to_the_bn(tmp_path: Path) -> None:
    """The legacy exporter folds Conv+BN into a Conv that keeps the *conv's* name, and names a module's
    second call ``relu_1``: no false alarm, the conv is "fused into" its BN, every call is matched."""
    loaded = load_model("zoo:resnet_basic")
    path = tmp_path / "resnet_ts.onnx"
    export(loaded, None, path, exporter="torchscript", opset=17)
    layers = _layers(loaded, path)
    assert layers.first_divergence is None
    by_name = {layer.name: layer for layer in layers.layers}
    assert by_name["layer2.conv1"].status == "fused" and by_name["layer2.conv1"].fused_into == "layer2.bn1"
    assert by_name["layer2.bn1"].status == "pass" and by_name["layer2.bn1"].op_type == "Conv"
    assert by_name["layer2.downsample.0"].fused_into == "layer2.downsample.1"
    assert by_name["layer1.relu#1"].status == by_name["layer1.relu#2"].status == "pass"
    assert by_name["layer1.relu#1"].onnx_value != by_name["layer1.relu#2"].onnx_value
    assert layers.counts["unmatched"] == 0
