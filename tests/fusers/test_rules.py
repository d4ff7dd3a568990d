"""The rule framework: RulePass in If branches and model functions, one registered Rule as a pass, pass names."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from fold_helpers import ATOL, RTOL, bn_arrays, run_ort, vi
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from normfold.cli import app
from normfold.errors import FusionError, UsageError
from normfold.fusers import (
    PASS_REGISTRY,
    NormfoldPass,
    PassContext,
    Rule,
    RulePass,
    Scope,
    Site,
    optimize,
    register_pass,
    register_rule,
)
from normfold.fusers._facts import GraphFacts
from normfold.fusers.base import DISABLED_REASON
from normfold.fusers.batchnorm import FuseBatchNormIntoConv

C = 3


def _conv_bn_nodes(x: str, y: str, prefix: str) -> list[onnx.NodeProto]:
    return [
        helper.make_node("Conv", [x, f"{prefix}w", f"{prefix}b"], [f"{prefix}c"], name=f"{prefix}conv"),
        helper.make_node(
            "BatchNormalization",
            [f"{prefix}c", f"{prefix}gamma", f"{prefix}beta", f"{prefix}mean", f"{prefix}var"],
            [y],
            name=f"{prefix}bn",
        ),
    ]


def _params(prefix: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    arrays = {"w": rng.standard_normal((C, C, 1, 1)).astype(np.float32), "b": rng.standard_normal(C).astype(np.float32)}
    arrays.update(bn_arrays(C, seed=2))
    return {f"{prefix}{k}": v for k, v in arrays.items()}


def _if_model() -> onnx.ModelProto:
    """``If(cond)``: the then-branch is Conv→BN on the outer ``x`` (weights are outer initializers)."""
    then_graph = helper.make_graph(_conv_bn_nodes("x", "then_y", "t_"), "then", [], [vi("then_y", [1, C, 4, 4])])
    else_graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["else_y"], name="else_relu")], "else", [], [vi("else_y", [1, C, 4, 4])]
    )
    node = helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_graph, else_branch=else_graph)
    inits = [numpy_helper.from_array(v, k) for k, v in _params("t_").items()]
    graph = helper.make_graph(
        [node], "g", [vi("x", [1, C, 4, 4]), vi("cond", [], TensorProto.BOOL)], [vi("y", [1, C, 4, 4])], inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _function_model() -> onnx.ModelProto:
    """``local.ConvBn(x)``: a model-local function whose body holds Constant weights and Conv→BN."""
    consts = [
        helper.make_node("Constant", [], [k], name=f"{k}_const", value=numpy_helper.from_array(v, k))
        for k, v in _params("f_").items()
    ]
    body = [*consts, *_conv_bn_nodes("fx", "fy", "f_")]
    opsets = [helper.make_opsetid("", 17)]
    function = helper.make_function("local", "ConvBn", ["fx"], ["fy"], body, opsets)
    call = helper.make_node("ConvBn", ["x"], ["y"], domain="local", name="call")
    graph = helper.make_graph([call], "g", [vi("x", [1, C, 4, 4])], [vi("y", [1, C, 4, 4])])
    return helper.make_model(
        graph,
        opset_imports=[*opsets, helper.make_opsetid("local", 1)],
        functions=[function],
        ir_version=10,
    )


def _x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((1, C, 4, 4)).astype(np.float32)


def test_rule_pass_folds_inside_an_if_branch() -> None:
    proto = _if_model()
    model = ir.serde.deserialize_model(proto)
    ctx = PassContext()

    assert RulePass(FuseBatchNormIntoConv, ctx)(model).modified

    then_branch = model.graph.node("branch").attributes["then_branch"].as_graph()
    assert [n.op_type for n in then_branch] == ["Conv"]
    assert [(e.status, e.nodes) for e in ctx.events] == [("applied", ("t_conv", "t_bn"))]
    after = ir.serde.serialize_model(model)
    for cond in (True, False):
        feeds = {"x": _x(), "cond": np.array(cond)}
        np.testing.assert_allclose(run_ort(after, feeds)[0], run_ort(proto, feeds)[0], atol=ATOL, rtol=RTOL)


def test_rule_pass_folds_inside_a_model_function() -> None:
    proto = _function_model()
    report = optimize(proto, passes=["fuse_bn_into_conv"])

    assert report.rules["fuse_bn_into_conv"].applied == 1
    assert report.verification is not None and report.verification.passed
    model = ir.serde.deserialize_model(proto)
    assert RulePass(FuseBatchNormIntoConv, PassContext())(model).modified
    body = model.functions[("local", "ConvBn", "")]
    assert "BatchNormalization" not in [n.op_type for n in body]
    folded = [n for n in body if n.op_type == "Conv"]
    assert len(folded) == 1 and all(v is not None and v.producer() is not None for v in folded[0].inputs[1:])
    assert not model.graph.initializers  # functions have no initializers: the fold made Constant nodes
    after = ir.serde.serialize_model(model)
    np.testing.assert_allclose(run_ort(after, {"x": _x()})[0], run_ort(proto, {"x": _x()})[0], atol=ATOL, rtol=RTOL)


class _DropRelu6(Rule[Site]):
    """Test-only rule: ``Clip(x, 0, 6)`` after a ``Relu`` is the same as ``Clip(x, 0, 6)`` on ``x``."""

    name = "_test_drop_relu_before_clip"
    anchors = ("Relu",)

    def match(self, facts: GraphFacts, node: ir.Node) -> Site | None:
        users = [u.node for u in node.outputs[0].uses()]
        if len(users) != 1 or users[0].op_type != "Clip" or node.outputs[0].is_graph_output():
            return None
        return Site(nodes=(node, users[0]), anchor=node)

    def rewrite(self, scope: Scope, site: Site) -> list[ir.Node]:
        relu, clip = site.nodes
        clip.replace_input_with(0, relu.inputs[0])
        scope.graph.remove(relu, safe=True)
        return []

    def describe(self, site: Site, created: list[ir.Node]) -> str:
        return "Relu dropped before Clip(0, 6)"


@pytest.fixture
def drop_relu_rule() -> Iterator[str]:
    register_rule(_DropRelu6)
    yield _DropRelu6.name
    PASS_REGISTRY.pop(_DropRelu6.name)


def _relu_clip() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Clip", ["r", "lo", "hi"], ["y"], name="clip"),
    ]
    inits = [numpy_helper.from_array(np.float32(0), "lo"), numpy_helper.from_array(np.float32(6), "hi")]
    graph = helper.make_graph(nodes, "g", [vi("x", [1, C, 4, 4])], [vi("y", [1, C, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_one_registered_rule_class_is_a_pass(drop_relu_rule: str) -> None:
    report = optimize(_relu_clip(), passes=[drop_relu_rule])

    assert report.ops_after == {"Clip": 1}
    rule = report.rules[drop_relu_rule]
    assert (rule.applied, rule.events[0].nodes, rule.events[0].reason) == (
        1,
        ("relu", "clip"),
        "Relu dropped before Clip(0, 6)",
    )
    assert report.verification is not None and report.verification.passed
    with pytest.raises(ValueError, match="registered twice"):
        register_rule(_DropRelu6)


def test_disabled_site_is_skipped_with_the_one_reason(drop_relu_rule: str) -> None:
    model = ir.serde.deserialize_model(_relu_clip())
    ctx = PassContext(disabled_sites={(drop_relu_rule, "relu")})

    assert not PASS_REGISTRY[drop_relu_rule](ctx)(model).modified
    assert [(e.status, e.reason) for e in ctx.events] == [("skipped", DISABLED_REASON)]


@pytest.mark.parametrize("passes", [",,,", " , ", "", []])
def test_an_empty_pass_list_is_an_error_not_every_pass(passes: str | list[str]) -> None:
    with pytest.raises(UsageError, match=r"no pass names given \(got .*\); name at least one of: .*fold_affine"):
        optimize(_relu_clip(), passes=passes, verify=False)


def test_cli_blank_passes_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    src, dst = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(_relu_clip(), str(src))
    res = CliRunner().invoke(app, ["optimize", str(src), "-o", str(dst), "--passes", ",,,"])
    assert res.exit_code == 2 and "error: no pass names given (got ',,,')" in res.output
    assert "Traceback" not in res.output and not dst.exists()


class _Boom(NormfoldPass):
    """Test-only pass with a bug."""

    name = "_test_boom"

    def run(self, model: ir.Model) -> bool:
        raise RuntimeError("boom")


def test_a_failing_pass_is_named_with_the_passes_before_it() -> None:
    register_pass(_Boom)
    try:
        with pytest.raises(FusionError, match=r"pass '_test_boom' failed after passes \['fold_constants'\]: "):
            optimize(_relu_clip(), passes=["fold_constants", _Boom.name], verify=False)
    finally:
        PASS_REGISTRY.pop(_Boom.name)


def test_a_rule_pass_states_its_precondition() -> None:
    """A rule that emits default-domain ops refuses a model that uses them without importing the opset."""
    proto = _relu_clip()
    del proto.opset_import[:]
    proto.opset_import.append(helper.make_opsetid("local", 1))
    with pytest.raises(FusionError, match="PreconditionError: rule 'fuse_layernorm' emits new default-domain ops"):
        optimize(proto, passes=["fuse_layernorm"], verify=False)
