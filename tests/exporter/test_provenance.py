"""Provenance accessor: dynamo metadata, legacy names, and the normalized key passes write."""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx import helper

from normfold.exporter.provenance import MODULE_PATH_KEY, module_path, set_module_path, stamp_module_paths


def _node(name: str = "", **props: str) -> onnx.NodeProto:
    node = helper.make_node("Relu", ["x"], ["y"], name=name)
    for k, v in props.items():
        node.metadata_props.add(key=k, value=v)
    return node


def test_dynamo_name_scopes() -> None:
    node = _node(**{"pkg.torch.onnx.name_scopes": "['', 'layer1', 'layer1.0', 'layer1.0.conv', 'conv2d']"})
    assert module_path(node) == "layer1.0.conv"
    assert module_path(_node(**{"pkg.torch.onnx.name_scopes": "['', 'add']"})) == ""


def test_legacy_names_mix_full_and_relative_scopes() -> None:
    assert module_path(_node("/layer1/layer1.0/conv/Conv")) == "layer1.0.conv"
    assert module_path(_node("/fc/Gemm")) == "fc"
    assert module_path(_node("/Relu")) == ""
    assert module_path(_node("Identity_3")) is None


def test_normalized_key_wins_and_works_on_ir_nodes() -> None:
    node = _node("/a/Conv")
    set_module_path(node, "b.bn")
    assert module_path(node) == "b.bn"
    set_module_path(node, "c.bn")
    assert [p.value for p in node.metadata_props if p.key == MODULE_PATH_KEY] == ["c.bn"]
    ir_node = ir.Node("", "Relu", [], name="/x/y/Relu")
    assert module_path(ir_node) == "x.y"
    set_module_path(ir_node, "z")
    assert module_path(ir_node) == "z"


def test_stamp_counts_only_known_nodes() -> None:
    graph = helper.make_graph([_node("/a/Relu"), _node("anon")], "g", [], [])
    model = helper.make_model(graph)
    assert stamp_module_paths(model) == 1


def test_resolve_module_path_maps_torchscript_quirks_onto_real_modules() -> None:
    from normfold.exporter.provenance import resolve_module_path

    modules = {"", "layer2", "layer2.downsample", "layer2.downsample.0", "layer1", "layer1.relu"}
    assert resolve_module_path("layer2.downsample.downsample.0", modules) == "layer2.downsample.0"
    assert resolve_module_path("layer1.relu_1", modules) == "layer1.relu"
    assert resolve_module_path("layer1.relu", modules) == "layer1.relu"  # exact paths pass unchanged
    assert resolve_module_path(None, modules) is None


def test_torchscript_export_stamps_only_real_module_paths(tmp_path) -> None:
    import onnx

    from normfold.exporter import export
    from normfold.models.loader import load_model

    loaded = load_model("zoo:resnet_basic")
    res = export(loaded, None, tmp_path / "r.onnx", exporter="torchscript", opset=17)
    modules = {name for name, _ in loaded.module.named_modules()}
    paths = {module_path(n) for n in onnx.load(str(res.path)).graph.node} - {None}
    assert paths <= modules, paths - modules
    assert any(p.endswith("downsample.0") for p in paths)
