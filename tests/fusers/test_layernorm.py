"""LayerNormFusion on real torch exports (dynamo and legacy), checked against eager on ORT CPU."""

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
from normfold.fusers.base import DISABLED_REASON, PassContext, RulePass
from normfold.fusers.layernorm import LayerNormFusion

ATOL, RTOL = 1e-5, 1e-4


class HandLN(nn.Module):
    """(x - μ)/sqrt(σ² + ε)·w + b over the last ``n`` axes, spelled the ways users write it."""

    def __init__(self, n: int = 1, affine: bool = True, square: str = "pow", inv: str = "div") -> None:
        super().__init__()
        self.n, self.square, self.inv = n, square, inv
        shape = (8,) if n == 1 else (4, 8)
        self.w = nn.Parameter(torch.randn(shape)) if affine else None
        self.b = nn.Parameter(torch.randn(shape)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(-self.n, 0))
        d = x - x.mean(dims, keepdim=True)
        var = (d.pow(2) if self.square == "pow" else d * d).mean(dims, keepdim=True)
        y = d * torch.rsqrt(var + 1e-5) if self.inv == "rsqrt" else d / torch.sqrt(var + 1e-5)
        if self.w is not None:
            y = y * self.w + self.b
        return y


class LookAlike(nn.Module):
    """Norm-shaped graphs that are not LayerNorm."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        m = x.mean(-1, keepdim=True)
        d = x - m
        if self.kind == "unbiased":
            return d / torch.sqrt(x.var(-1, keepdim=True) + 1e-5)
        if self.kind == "bessel_sum":
            return d / torch.sqrt((d * d).sum(-1, keepdim=True) / (x.shape[-1] - 1) + 1e-5)
        if self.kind == "eps_on_std":
            return d / (torch.sqrt((d * d).mean(-1, keepdim=True)) + 1e-5)
        if self.kind == "eps_input":
            return d / torch.sqrt((d * d).mean(-1, keepdim=True) + z[0, 0, :1])
        if self.kind == "other_stats":
            dz = z - z.mean(-1, keepdim=True)
            return d / torch.sqrt((dz * dz).mean(-1, keepdim=True) + 1e-5)
        if self.kind == "mixed_axes":
            return d / torch.sqrt((d * d).mean(-2, keepdim=True) + 1e-5)
        if self.kind == "channel_axis":
            d = x - x.mean(1, keepdim=True)
            return d / torch.sqrt((d * d).mean(1, keepdim=True) + 1e-5)
        raise ValueError(self.kind)


class Wrap(nn.Module):
    """Puts the norm under a named submodule so provenance has a path to carry."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.norm(*xs)


def _export(module: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, dynamo: bool, opset: int) -> ir.Model:
    kwargs = {"dynamo": True, "optimize": False} if dynamo else {"dynamo": False}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), inputs, str(path), opset_version=opset, **kwargs)
    return ir.load(path)


def _run(model: ir.Model, inputs: tuple[torch.Tensor, ...]) -> np.ndarray:
    proto = ir.to_proto(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs, strict=False)}
    return session.run(None, feeds)[0]


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph if n.op_type != "Constant"]


POSITIVE = {
    "last_axis": HandLN(1),
    "two_axes": HandLN(2),
    "no_affine": HandLN(1, affine=False),
    "mul_rsqrt": HandLN(2, square="mul", inv="rsqrt"),
    "two_axes_no_affine_rsqrt": HandLN(2, affine=False, inv="rsqrt"),
}


# dynamo exports cost ~4 s each on 2 cores: two of them run by default, the rest are marked slow.
FAST_DYNAMO = {"two_axes", "mul_rsqrt"}
CASES = [
    pytest.param(case, dynamo, id=f"{case}-{'dynamo18' if dynamo else 'legacy17'}", marks=marks)
    for case in POSITIVE
    for dynamo, marks in ((True, () if case in FAST_DYNAMO else (pytest.mark.slow,)), (False, ()))
]


@pytest.mark.parametrize(("case", "dynamo"), CASES)
def test_handwritten_layernorm_fuses(case: str, dynamo: bool, tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = Wrap(POSITIVE[case]).eval()
    x = torch.randn(2, 3, 4, 8)
    model = _export(module, (x,), tmp_path / "m.onnx", dynamo, 18 if dynamo else 17)
    ctx = PassContext()

    result = RulePass(LayerNormFusion, ctx)(model)

    assert result.modified
    assert _ops(model) == ["LayerNormalization"]
    (ln,) = list(model.graph)[-1:]
    norm = POSITIVE[case]
    assert ln.attributes["axis"].as_int() == 4 - norm.n
    assert ln.attributes["epsilon"].as_float() == pytest.approx(1e-5)
    assert ln.attributes["stash_type"].as_int() == 1
    assert len(ln.inputs) == (3 if norm.w is not None else 2)
    scale = ln.inputs[1].const_value.numpy()
    assert scale.shape == ((8,) if norm.n == 1 else (4, 8))
    if norm.w is None:
        np.testing.assert_array_equal(scale, np.ones_like(scale))
    assert module_path(ln) == "norm"
    assert [e.status for e in ctx.events] == ["applied"]
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    with torch.no_grad():
        expected = module(x).numpy()
    np.testing.assert_allclose(_run(model, (x,)), expected, atol=ATOL, rtol=RTOL)


LOOK_ALIKES = {
    "unbiased": "Bessel",
    "bessel_sum": "Bessel",
    "eps_on_std": "standard deviation",
    "eps_input": "not a constant",
    "other_stats": "different tensor",
    "mixed_axes": "the variance reduces over axes [1] but the mean over axes [2]",
    "channel_axis": "not the trailing axes",
}


@pytest.mark.parametrize("kind", list(LOOK_ALIKES))
def test_look_alikes_are_refused_with_reason(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = Wrap(LookAlike(kind))
    inputs = (torch.randn(2, 3, 8), torch.rand(2, 3, 8) + 0.5)
    model = _export(module, inputs, tmp_path / "m.onnx", dynamo=False, opset=17)
    before = ir.to_proto(model).SerializeToString()
    ctx = PassContext()

    result = RulePass(LayerNormFusion, ctx)(model)

    assert not result.modified
    assert ir.to_proto(model).SerializeToString() == before
    skipped = [e for e in ctx.events if e.status == "skipped"]
    assert skipped, ctx.events
    assert any(LOOK_ALIKES[kind] in e.reason for e in skipped), [e.reason for e in skipped]
    assert all(e.nodes for e in skipped)


def test_affine_varying_over_batch_axis_stays_outside(tmp_path: Path) -> None:
    """γ of shape (3, 1) varies over a non-normalized axis: LN is fused without it, the Mul stays."""

    class RowScaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln = HandLN(1, affine=False)
            self.w = nn.Parameter(torch.randn(3, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.ln(x) * self.w

    torch.manual_seed(0)
    module = RowScaled().eval()
    x = torch.randn(2, 3, 8)
    model = _export(module, (x,), tmp_path / "m.onnx", dynamo=False, opset=17)

    assert RulePass(LayerNormFusion, PassContext())(model).modified

    assert _ops(model) == ["LayerNormalization", "Mul"]
    with torch.no_grad():
        np.testing.assert_allclose(_run(model, (x,)), module(x).numpy(), atol=ATOL, rtol=RTOL)


def test_shared_intermediate_is_refused(tmp_path: Path) -> None:
    class Leaky(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            d = x - x.mean(-1, keepdim=True)
            return d / torch.sqrt((d * d).mean(-1, keepdim=True) + 1e-5), d

    model = _export(Leaky(), (torch.randn(2, 8),), tmp_path / "m.onnx", dynamo=False, opset=17)
    ctx = PassContext()

    assert not RulePass(LayerNormFusion, ctx)(model).modified
    assert "ReduceMean" in _ops(model)
    assert any("graph output" in e.reason for e in ctx.events)


def _opset13_ln() -> ir.Model:
    """A decomposed LN at opset 13 (axes as attributes), written by hand."""
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[-1]),
        helper.make_node("Sub", ["x", "m"], ["d"]),
        helper.make_node("Mul", ["d", "d"], ["d2"]),
        helper.make_node("ReduceMean", ["d2"], ["v"], axes=[-1]),
        helper.make_node("Add", ["v", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["s"]),
        helper.make_node("Div", ["d", "s"], ["n"]),
        helper.make_node("ReduceMean", ["n"], ["y"], axes=[1], keepdims=1),
    ]
    graph = helper.make_graph(
        nodes,
        "ln13",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 1, 8])],
        [helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-5])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    return ir.from_proto(proto)


def test_opset_below_17_is_skipped_without_target() -> None:
    model = _opset13_ln()
    ctx = PassContext()

    assert not RulePass(LayerNormFusion, ctx)(model).modified

    assert model.opset_imports[""] == 13
    assert [e.reason for e in ctx.events] == [
        "model opset 13 < 17 (LayerNormalization); pass --target-opset 17 to raise it"
    ]


def test_target_opset_raises_and_converts_remaining_reduce_axes() -> None:
    model = _opset13_ln()
    x = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x})[0]

    assert RulePass(LayerNormFusion, PassContext(target_opset=18))(model).modified

    assert model.opset_imports[""] == 18
    assert model.ir_version >= 8
    assert _ops(model) == ["LayerNormalization", "ReduceMean"]
    reduce = next(n for n in model.graph if n.op_type == "ReduceMean")
    assert "axes" not in reduce.attributes and len(reduce.inputs) == 2
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    np.testing.assert_allclose(_run(model, (torch.from_numpy(x),)), expected, atol=ATOL, rtol=RTOL)


def test_zoo_transformer_block_at_opset_14_is_raised_to_17(tmp_path: Path) -> None:
    """The legacy exporter decomposes nn.LayerNorm below opset 17; --target-opset 17 fuses both back."""
    from normfold.models import ZOO, seeded_inputs

    entry = ZOO["transformer_block"]
    module, inputs = entry.build(), seeded_inputs(entry.inputs)
    model = _export(module, inputs, tmp_path / "m.onnx", dynamo=False, opset=14)
    ctx = PassContext(target_opset=17)

    assert RulePass(LayerNormFusion, ctx)(model).modified

    assert model.opset_imports[""] == 17
    assert _ops(model).count("LayerNormalization") == 2
    assert "ReduceMean" not in _ops(model)
    assert sorted(module_path(n) for n in model.graph if n.op_type == "LayerNormalization") == ["ln1", "ln2"]
    with torch.no_grad():
        np.testing.assert_allclose(_run(model, inputs), module(*inputs).numpy(), atol=ATOL, rtol=RTOL)


def test_site_disabled_by_verification_is_skipped(tmp_path: Path) -> None:
    """The pipeline disables a rule at the node an event names first; the pass must then leave it."""
    model = _export(Wrap(HandLN(1)), (torch.randn(2, 3, 8),), tmp_path / "m.onnx", dynamo=False, opset=17)
    ctx = PassContext(disabled_sites={("fuse_layernorm", "/norm/ReduceMean")})

    assert not RulePass(LayerNormFusion, ctx)(model).modified

    assert "LayerNormalization" not in _ops(model)
    assert [(e.status, e.nodes[0], e.reason) for e in ctx.events] == [("skipped", "/norm/ReduceMean", DISABLED_REASON)]
