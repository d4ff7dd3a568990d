"""GroupNormFusion on real torch exports, checked against eager on ORT CPU, and the opset-raise guard."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from normfold.exporter.provenance import module_path
from normfold.fusers._opset import opset_raise_blocker
from normfold.fusers.base import PassContext, RulePass
from normfold.fusers.groupnorm import GroupNormFusion

ATOL, RTOL = 1e-5, 1e-4


class HandGN(nn.Module):
    """The zoo's ``groupnorm_handwritten`` form: view(N, G, -1), mean, var, view back, per-channel affine."""

    def __init__(self, channels: int = 8, groups: int = 4, unbiased: bool = False, view: str = "group") -> None:
        super().__init__()
        self.groups, self.unbiased, self.view = groups, unbiased, view
        self.w = nn.Parameter(torch.randn(channels))
        self.b = nn.Parameter(torch.randn(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if self.view == "group":
            xg = x.view(n, self.groups, -1)
        elif self.view == "no_batch":
            xg = x.reshape(1, n * self.groups, -1)
        else:
            xg = x.view(n, -1, 3)
        mean = xg.mean(-1, keepdim=True)
        var = xg.var(-1, keepdim=True, unbiased=self.unbiased)
        xg = (xg - mean) / torch.sqrt(var + 1e-5)
        return xg.view(n, c, h, w) * self.w[None, :, None, None] + self.b[None, :, None, None]


class Wrap(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.gn = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gn(x)


def _groupnorm(groups: int = 4, channels: int = 8, affine: bool = True) -> nn.Module:
    gn = nn.GroupNorm(groups, channels, affine=affine)
    if affine:
        with torch.no_grad():
            gn.weight.normal_()
            gn.bias.normal_()
    return gn


def _export(module: nn.Module, x: torch.Tensor, path: Path, dynamo: bool, opset: int) -> ir.Model:
    kwargs = {"dynamo": True, "optimize": False} if dynamo else {"dynamo": False}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (x,), str(path), opset_version=opset, **kwargs)
    return ir.load(path)


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph if n.op_type != "Constant"]


CASES = [
    pytest.param("nn", True, 18, id="nn.GroupNorm-dynamo18"),
    pytest.param("nn", False, 17, id="nn.GroupNorm-legacy17"),
    pytest.param("nn_no_affine", False, 17, id="nn.GroupNorm-no-affine-legacy17"),
    pytest.param("hand", False, 17, id="handwritten-legacy17"),
    pytest.param("hand", True, 18, id="handwritten-dynamo18", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("case", "dynamo", "opset"), CASES)
def test_groupnorm_fuses_to_gn21_when_target_opset_asks(case: str, dynamo: bool, opset: int, tmp_path: Path) -> None:
    torch.manual_seed(0)
    norm = {"nn": lambda: _groupnorm(), "nn_no_affine": lambda: _groupnorm(affine=False), "hand": HandGN}[case]()
    module = Wrap(norm).eval()
    x = torch.randn(2, 8, 5, 5)
    model = _export(module, x, tmp_path / "m.onnx", dynamo, opset)
    ctx = PassContext(target_opset=21)

    result = RulePass(GroupNormFusion, ctx)(model)

    assert result.modified
    assert _ops(model) == ["GroupNormalization"]
    assert model.opset_imports[""] == 21
    gn = next(n for n in model.graph if n.op_type == "GroupNormalization")
    assert gn.attributes["num_groups"].as_int() == 4
    assert gn.attributes["epsilon"].as_float() == pytest.approx(1e-5)
    assert gn.attributes["stash_type"].as_int() == 1
    assert [v.const_value.shape.numpy() for v in gn.inputs[1:]] == [(8,), (8,)]
    assert module_path(gn) == "gn"
    assert [e.status for e in ctx.events] == ["applied"]
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    with torch.no_grad():
        expected = module(x).numpy()
    np.testing.assert_allclose(_run(model, x.numpy()), expected, atol=ATOL, rtol=RTOL)


def test_below_opset_21_without_target_is_left_alone(tmp_path: Path) -> None:
    model = _export(Wrap(_groupnorm()), torch.randn(2, 8, 5, 5), tmp_path / "m.onnx", False, 17)
    before = ir.to_proto(model).SerializeToString()
    ctx = PassContext()

    assert not RulePass(GroupNormFusion, ctx)(model).modified

    assert ir.to_proto(model).SerializeToString() == before
    assert [e.status for e in ctx.events] == ["skipped"]
    assert ctx.events[0].reason == ("model opset 17 < 21 (GroupNormalization-21); pass --target-opset 21 to raise it")
    assert "/gn/InstanceNormalization" in ctx.events[0].nodes


LOOK_ALIKES = [
    pytest.param({"unbiased": True}, "Bessel", id="unbiased-var"),
    pytest.param({"channels": 6, "groups": 4}, "does not divide C=6", id="groups-do-not-divide-C"),
    pytest.param({"view": "no_batch"}, "does not keep the batch axis", id="reshape-merges-batch"),
    pytest.param({"view": "rows_of_3"}, "does not divide C=8", id="reshape-not-group-layout"),
]


@pytest.mark.parametrize(("kwargs", "reason"), LOOK_ALIKES)
def test_groupnorm_look_alikes_are_refused(kwargs: dict[str, object], reason: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    channels = int(kwargs.get("channels", 8))  # type: ignore[call-overload]
    size = 2 if channels == 6 else 3
    module = Wrap(HandGN(**kwargs))  # type: ignore[arg-type]
    model = _export(module, torch.randn(2, channels, size, size), tmp_path / "m.onnx", False, 17)
    before = ir.to_proto(model).SerializeToString()
    ctx = PassContext(target_opset=21)

    assert not RulePass(GroupNormFusion, ctx)(model).modified

    assert ir.to_proto(model).SerializeToString() == before
    reasons = [e.reason for e in ctx.events if e.status == "skipped"]
    assert any(reason in r for r in reasons), reasons


def _gn18_model() -> ir.Model:
    nodes = [helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=2, epsilon=1e-5)]
    graph = helper.make_graph(
        nodes,
        "gn18",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 3, 3])],
        [
            helper.make_tensor("s", TensorProto.FLOAT, [2], [1.0, 2.0]),
            helper.make_tensor("b", TensorProto.FLOAT, [2], [0.0, 1.0]),
        ],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10))


def test_opset_raise_refuses_groupnorm18_whose_meaning_changes() -> None:
    reason = opset_raise_blocker(_gn18_model(), 21)

    assert reason is not None
    assert "GroupNormalization-21" in reason


def test_opset_raise_allows_type_only_changes(tmp_path: Path) -> None:
    model = _export(Wrap(_groupnorm()), torch.randn(2, 8, 5, 5), tmp_path / "m.onnx", False, 17)

    assert opset_raise_blocker(model, 21) is None
    assert opset_raise_blocker(model, 17) is None


def test_every_site_of_a_stack_fuses(tmp_path: Path) -> None:
    """Regression: shapes of later sites come from inference run before the first rewrite."""
    torch.manual_seed(0)
    module = nn.Sequential(_groupnorm(), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1), _groupnorm(2, 8)).eval()
    x = torch.randn(1, 8, 6, 6)
    model = _export(module, x, tmp_path / "m.onnx", False, 17)
    ctx = PassContext(target_opset=21)

    assert RulePass(GroupNormFusion, ctx)(model).modified

    assert [e.status for e in ctx.events] == ["applied", "applied"]
    assert _ops(model).count("GroupNormalization") == 2
    assert "InstanceNormalization" not in _ops(model)
    with torch.no_grad():
        np.testing.assert_allclose(_run(model, x.numpy()), module(x).numpy(), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("case", ["nn", "hand"])
def test_dynamic_batch_legacy_export_fuses(case: str, tmp_path: Path) -> None:
    """x.view(x.shape[0], G, -1) with a dynamic batch: the group layout is proven from shape symbols."""
    torch.manual_seed(0)
    module = Wrap(_groupnorm() if case == "nn" else HandGN()).eval()
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.randn(2, 8, 5, 5),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            dynamic_axes={"x": {0: "n"}},
        )
    model = ir.load(path)

    assert RulePass(GroupNormFusion, PassContext(target_opset=21))(model).modified

    assert _ops(model) == ["GroupNormalization"]
    x = torch.randn(3, 8, 5, 5)
    with torch.no_grad():
        np.testing.assert_allclose(_run(model, x.numpy()), module(x).numpy(), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(("name", "sites"), [("groupnorm_handwritten", 1), ("unet_resblock", 2)])
def test_zoo_models_fuse_every_groupnorm(name: str, sites: int, tmp_path: Path) -> None:
    from normfold.models import ZOO, seeded_inputs

    entry = ZOO[name]
    module, inputs = entry.build(), seeded_inputs(entry.inputs)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, inputs, str(path), dynamo=False, opset_version=17)
    model = ir.load(path)
    ctx = PassContext(target_opset=21)

    assert RulePass(GroupNormFusion, ctx)(model).modified

    assert [e.status for e in ctx.events] == ["applied"] * sites
    assert _ops(model).count("GroupNormalization") == sites
    assert not {"InstanceNormalization", "ReduceMean"} & set(_ops(model))
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, module(*inputs).numpy(), atol=ATOL, rtol=RTOL)


def test_opset_raise_refuses_training_batchnorm_outputs() -> None:
    outs = ["y", "mean", "var", "saved_mean", "saved_var"]
    nodes = [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], outs)]
    params = [helper.make_tensor(n, TensorProto.FLOAT, [2], [1.0, 1.0]) for n in "sbmv"]
    graph = helper.make_graph(
        nodes,
        "bn9",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outs],
        params,
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=4))

    reason = opset_raise_blocker(model, 21)

    assert reason is not None and "training_mode" in reason
