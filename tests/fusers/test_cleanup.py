"""The general clean-up stage: shape-subgraph folding, CSE, identity/dead-node removal, shapes for the rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import torch
from fold_helpers import assert_close, export_legacy, make_model, ops, randomize_bn, run_ort, vi
from onnx import helper
from torch import nn

from normfold.fusers import optimize
from normfold.fusers.base import PassContext
from normfold.fusers.cleanup import Cleanup, has_duplicate_initializers, may_fold


def shape_chain_model():
    """TorchScript-style flatten: ``Shape → Gather(0) → Unsqueeze → Concat(-1) → Reshape``, written twice
    (CSE), behind an Identity, with a dead Constant and an unused initializer."""
    nodes = [
        helper.make_node("Identity", ["x"], ["xi"]),
        helper.make_node("Constant", [], ["dead"], value=helper.make_tensor("d", 1, [1], [1.0])),
    ]
    for k in ("a", "b"):
        nodes += [
            helper.make_node("Shape", ["xi"], [f"s{k}"]),
            helper.make_node("Gather", [f"s{k}", "zero"], [f"n{k}"], axis=0),
            helper.make_node("Unsqueeze", [f"n{k}", "axes"], [f"u{k}"]),
            helper.make_node("Concat", [f"u{k}", "minus1"], [f"t{k}"], axis=0),
            helper.make_node("Reshape", ["xi", f"t{k}"], [f"r{k}"]),
        ]
    nodes.append(helper.make_node("Add", ["ra", "rb"], ["y"]))
    inits = {
        "zero": np.array(0, np.int64),
        "axes": np.array([0], np.int64),
        "minus1": np.array([-1], np.int64),
        "unused": np.ones(4, np.float32),
    }
    return make_model(nodes, [vi("x", [2, 3, 4])], [vi("y", [2, 12])], inits)


def test_shape_subgraphs_duplicates_and_identities_are_removed(tmp_path: Path) -> None:
    model = shape_chain_model()
    report = optimize(model, tmp_path / "o.onnx", passes=["cleanup"])
    assert ops(tmp_path / "o.onnx") == {"Reshape": 1, "Add": 1}
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    np.testing.assert_array_equal(run_ort(tmp_path / "o.onnx", {"x": x})[0], (x + x).reshape(2, 12))
    reasons = " | ".join(e.reason for e in report.rules["cleanup"].events)
    assert "Shape×" in reasons and "common subexpression elimination: removed" in reasons
    assert report.verification is not None and report.verification.passed


def test_cleanup_reports_no_change_on_a_clean_graph() -> None:
    node = helper.make_node("Relu", ["x"], ["y"])
    model = ir.serde.deserialize_model(make_model([node], [vi("x", [1, 4])], [vi("y", [1, 4])], {}))
    ctx = PassContext()
    assert Cleanup(ctx)(model).modified is False and ctx.events == []


def test_torchscript_linear_batchnorm1d_folds_once_shapes_are_known(tmp_path: Path) -> None:
    """The legacy exporter writes Linear(bias=False) as Transpose(W) → MatMul with no shapes; folding the
    Transpose gives the BN rule a constant weight and the inferred rank it needs."""
    module = nn.Sequential(nn.Linear(8, 4, bias=False), randomize_bn(nn.BatchNorm1d(4), 1)).eval()
    x = torch.randn(3, 8)
    path = export_legacy(module, (x,), tmp_path / "m.onnx")
    assert ops(path)["BatchNormalization"] == 1
    report = optimize(path, tmp_path / "o.onnx")
    assert "BatchNormalization" not in report.ops_after and "Transpose" not in report.ops_after
    assert_close(run_ort(tmp_path / "o.onnx", {"onnx::MatMul_0": x.numpy()})[0], module(x))


def _conv_bn_relu() -> ir.Model:
    """Conv → BN → Relu with every input from the graph input: no constant work for the clean-up."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"]),
        helper.make_node("Relu", ["n"], ["y"]),
    ]
    inits = {"w": rng.standard_normal((4, 4, 1, 1)).astype(np.float32)}
    inits.update({k: rng.uniform(0.5, 1.5, 4).astype(np.float32) for k in ("g", "b", "m", "v")})
    return ir.serde.deserialize_model(make_model(nodes, [vi("x", [1, 4, 2, 2])], [vi("y", [1, 4, 2, 2])], inits))


def test_fold_precheck_skips_only_graphs_with_nothing_to_fold() -> None:
    model = _conv_bn_relu()
    assert may_fold(model) is False
    relu = next(n for n in model.graph if n.op_type == "Relu")
    relu.replace_input_with(0, model.graph.initializers["g"])  # reads only a constant: folds
    assert may_fold(model) is True
    assert may_fold(ir.serde.deserialize_model(shape_chain_model())) is True  # Shape/Gather/Reshape evaluators


def test_dedup_precheck_finds_equal_initializers_in_either_proto_encoding() -> None:
    model = _conv_bn_relu()
    assert has_duplicate_initializers(model) is False
    proto = ir.to_proto(model)
    g = onnx.numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "g"))
    proto.graph.initializer.append(helper.make_tensor("g2", onnx.TensorProto.FLOAT, [4], g.tolist()))
    assert not proto.graph.initializer[-1].HasField("raw_data")  # float_data: same bytes as 'g' once read
    assert has_duplicate_initializers(ir.serde.deserialize_model(proto)) is True


def test_equal_initializers_are_merged_so_cse_merges_their_readers(tmp_path: Path) -> None:
    nodes = [helper.make_node("Mul", ["x", k], [f"m{k}"]) for k in ("a", "b")]
    nodes.append(helper.make_node("Add", ["ma", "mb"], ["y"]))
    scale = np.array([0.5, 2.0, -1.0, 3.0], np.float32)
    model = make_model(nodes, [vi("x", [1, 4])], [vi("y", [1, 4])], {"a": scale, "b": scale.copy()})
    report = optimize(model, tmp_path / "o.onnx", passes=["cleanup"])
    assert ops(tmp_path / "o.onnx") == {"Mul": 1, "Add": 1}
    assert report.verification is not None and report.verification.passed
