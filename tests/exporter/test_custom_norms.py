"""--norm-export custom: TensorRT-plugin custom ops whose model-local functions keep the exact math."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from normfold.exporter.custom_norms import PLUGIN_FIELDS, TRT_PLUGIN_DOMAIN, to_custom_norms

RNG = np.random.default_rng(0)
W = {name: RNG.standard_normal(n).astype(np.float32) for name, n in [("gs", 8), ("gb", 8), ("is", 8), ("ib", 8)]}
W |= {name: RNG.standard_normal(6).astype(np.float32) for name in ("ls", "lb")}


def _norm_chain(opset: int = 21, ln_bias: bool = True, ln_stats: bool = False) -> onnx.ModelProto:
    """x[2,8,5,6] → GroupNorm(2 groups) → InstanceNorm → LayerNorm(last axis)."""
    ln_inputs = ["i", "ls", "lb"] if ln_bias else ["i", "ls"]
    ln_outputs = ["y", "mean"] if ln_stats else ["y"]
    nodes = [
        helper.make_node("GroupNormalization", ["x", "gs", "gb"], ["g"], num_groups=2, epsilon=1e-4, name="gn"),
        helper.make_node("InstanceNormalization", ["g", "is", "ib"], ["i"], epsilon=1e-3, name="in"),
        helper.make_node("LayerNormalization", ln_inputs, ln_outputs, axis=-1, epsilon=1e-5, name="ln"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8, 5, 6])]
    if ln_stats:
        outputs.append(helper.make_tensor_value_info("mean", TensorProto.FLOAT, [2, 8, 5, 1]))
    graph = helper.make_graph(
        nodes,
        "norms",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 5, 6])],
        outputs,
        [numpy_helper.from_array(v, k) for k, v in W.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def test_custom_ops_match_native_and_eager(tmp_path: Path) -> None:
    native = _norm_chain()
    report = to_custom_norms(native, tmp_path / "custom.onnx")
    custom = onnx.load(str(tmp_path / "custom.onnx"))
    onnx.checker.check_model(custom, full_check=True)
    assert report.replaced == {"GroupNormalizationPlugin": 1, "InstanceNormalization_TRT": 1}
    assert [(n.domain, n.op_type) for n in custom.graph.node] == [
        (TRT_PLUGIN_DOMAIN, "GroupNormalizationPlugin"),
        (TRT_PLUGIN_DOMAIN, "InstanceNormalization_TRT"),
        ("", "LayerNormalization"),  # TensorRT has no LayerNorm plugin: native → INormalizationLayer
    ]
    assert {(f.domain, f.name) for f in custom.functions} == {
        (TRT_PLUGIN_DOMAIN, "GroupNormalizationPlugin"),
        (TRT_PLUGIN_DOMAIN, "InstanceNormalization_TRT"),
    }
    assert {i.domain: i.version for i in custom.opset_import}[TRT_PLUGIN_DOMAIN] == 1
    assert {t.name for t in custom.graph.initializer} == {"gs", "gb", "ls", "lb"}  # IN params moved to fields

    x = RNG.standard_normal((2, 8, 5, 6)).astype(np.float32)
    got = _run(custom, x)
    np.testing.assert_allclose(got, _run(native, x), atol=1e-5, rtol=0)
    t = torch.from_numpy(x)
    g = F.group_norm(t, 2, torch.from_numpy(W["gs"]), torch.from_numpy(W["gb"]), eps=1e-4)
    i = F.instance_norm(g, weight=torch.from_numpy(W["is"]), bias=torch.from_numpy(W["ib"]), eps=1e-3)
    want = F.layer_norm(i, (6,), torch.from_numpy(W["ls"]), torch.from_numpy(W["lb"]), eps=1e-5)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=1e-5)


def test_plugin_fields_and_versions() -> None:
    custom = to_custom_norms(_norm_chain(), plugin_version="2", plugin_namespace="acme").model
    nodes = {n.op_type: _attrs(n) for n in custom.graph.node if n.domain == TRT_PLUGIN_DOMAIN}
    for attrs in nodes.values():
        assert attrs["plugin_version"] == b"2" and attrs["plugin_namespace"] == b"acme"
    assert nodes["GroupNormalizationPlugin"]["num_groups"] == 2
    assert nodes["GroupNormalizationPlugin"]["eps"] == pytest.approx(1e-4)
    inorm = nodes["InstanceNormalization_TRT"]
    np.testing.assert_allclose(inorm["scales"], W["is"], rtol=1e-7)
    np.testing.assert_allclose(inorm["bias"], W["ib"], rtol=1e-7)
    assert (inorm["relu"], inorm["alpha"], inorm["epsilon"]) == (0, 0.0, pytest.approx(1e-3))
    in_node = next(n for n in custom.graph.node if n.op_type == "InstanceNormalization_TRT")
    assert list(in_node.input) == ["g"]


_ONNX_TYPES = {
    onnx.AttributeProto.FLOAT: "FLOAT",
    onnx.AttributeProto.INT: "INT",
    onnx.AttributeProto.FLOATS: "FLOATS",
}


def test_every_plugin_attribute_is_a_creator_field_of_the_right_type() -> None:
    """The parser silently drops attributes that are not creator fields (GN once wrote ``epsilon``)."""
    custom = to_custom_norms(_norm_chain()).model
    for node in custom.graph.node:
        if node.domain != TRT_PLUGIN_DOMAIN:
            continue
        fields = {k: v.name for k, v in PLUGIN_FIELDS[node.op_type].items()}
        got = {a.name: _ONNX_TYPES.get(a.type, str(a.type)) for a in node.attribute}
        got.pop("plugin_version"), got.pop("plugin_namespace")
        assert got == fields, node.op_type
    fn = {f.name: f for f in custom.functions}["GroupNormalizationPlugin"]
    names = set(fn.attribute) | {a.name for a in fn.attribute_proto}
    assert {"eps", "num_groups"} <= names and "epsilon" not in names


def test_group_norm_eps_far_from_default_survives(tmp_path: Path) -> None:
    """eps = 0.5 (not 1e-5) reaches the GN function body through the ``eps`` field: ORT CPU agrees with native."""
    native = _norm_chain()
    for node in native.graph.node:
        for attr in node.attribute:
            if attr.name == "epsilon":
                attr.f = 0.5
    custom = to_custom_norms(native).model
    gn = next(n for n in custom.graph.node if n.op_type == "GroupNormalizationPlugin")
    assert _attrs(gn)["eps"] == pytest.approx(0.5)
    x = RNG.standard_normal((2, 8, 5, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(custom, x), _run(native, x), atol=1e-5, rtol=0)
    default_eps = to_custom_norms(_norm_chain()).model
    assert not np.allclose(_run(custom, x), _run(default_eps, x), atol=1e-3)


def test_layernorm_is_kept_native_with_the_reason() -> None:
    native = _norm_chain(ln_bias=False)
    report = to_custom_norms(native, ops=("LayerNormalization",))
    assert report.replaced == {}
    (event,) = report.events
    assert event.status == "skipped" and "no LayerNorm plugin" in event.reason
    assert report.model is not None
    assert [n.op_type for n in report.model.graph.node] == [n.op_type for n in native.graph.node]


def test_skips_say_why() -> None:
    report = to_custom_norms(_norm_chain(ln_stats=True))
    reasons = {e.nodes[0]: e.reason for e in report.events if e.status == "skipped"}
    assert "no LayerNorm plugin" in reasons["ln"]
    assert "LayerNorm" not in report.replaced
    old = _norm_chain(opset=18)
    old.graph.node[0].ClearField("attribute")
    old.graph.node[0].attribute.extend([helper.make_attribute("num_groups", 8)])
    report18 = to_custom_norms(old, ops=("GroupNormalization",))
    (event,) = report18.events
    assert event.status == "skipped" and "opset >= 21" in event.reason
    assert report18.replaced == {}


class _Norms(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.gn = torch.nn.GroupNorm(4, 8)
        self.inorm = torch.nn.InstanceNorm2d(8, affine=True)
        self.ln = torch.nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.inorm(self.gn(self.conv(x))).permute(0, 2, 3, 1))


@pytest.mark.slow
def test_export_norm_export_custom_matches_eager(tmp_path: Path) -> None:
    from normfold.exporter import export

    torch.manual_seed(0)
    module = _Norms().eval()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 3, 6, 6)
    result = export(module, (x,), tmp_path / "custom.onnx", opset=21, norm_export="custom")
    model = onnx.load(str(result.path))
    assert {n.op_type for n in model.graph.node if n.domain == TRT_PLUGIN_DOMAIN} == {
        "GroupNormalizationPlugin",
        "InstanceNormalization_TRT",
    }
    assert any(n.op_type == "LayerNormalization" for n in model.graph.node)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.inference_mode():
        want = module(x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
