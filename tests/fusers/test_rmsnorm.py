"""RMSNormFusion on real torch exports (legacy and dynamo), checked against eager on ORT CPU."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from torch import nn

from normfold.exporter.provenance import module_path
from normfold.fusers.base import PASS_REGISTRY, PassContext, RulePass
from normfold.fusers.rmsnorm import KEPT_ON_ORT_CPU, RMSNormFusion


class LlamaRMSNorm(nn.Module):
    """transformers' LlamaRMSNorm; ``spelling`` picks a look-alike or another exact spelling."""

    def __init__(self, dim: int = 16, eps: float = 1e-6, spelling: str = "llama") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)
        self.eps, self.spelling = eps, spelling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        ms = (h * h).mean(-1, keepdim=True) if self.spelling == "mul_square" else h.pow(2).mean(-1, keepdim=True)
        if self.spelling == "eps_on_rms":
            h = h / (torch.sqrt(ms) + self.eps)
        elif self.spelling == "div_sqrt":
            h = h / torch.sqrt(ms + self.eps)
        else:
            h = h * torch.rsqrt(ms + self.eps)
        return self.weight * h.to(dtype)


class Net(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.lin(x))


def _export(module: nn.Module, x: torch.Tensor, path: Path, dynamo: bool, opset: int) -> ir.Model:
    kwargs = {"dynamo": True, "optimize": False} if dynamo else {"dynamo": False}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (x,), str(path), opset_version=opset, **kwargs)
    model = ir.load(path)
    PASS_REGISTRY["cleanup"](PassContext())(model)  # as in the pipeline
    return model


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


EXACT = [
    pytest.param("llama", True, 23, None, id="llama-dynamo23"),
    pytest.param("llama", False, 17, 23, id="llama-legacy17-target-opset23"),
    pytest.param("mul_square", False, 17, 23, id="mul-square-legacy"),
    pytest.param("div_sqrt", True, 23, None, id="div-sqrt-dynamo23"),
]


@pytest.mark.parametrize(("spelling", "dynamo", "opset", "target_opset"), EXACT)
def test_rmsnorm_fuses_to_rmsnormalization23(
    spelling: str, dynamo: bool, opset: int, target_opset: int | None, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    module = Net(LlamaRMSNorm(spelling=spelling)).eval()
    x = torch.randn(2, 5, 16)
    model = _export(module, x, tmp_path / "m.onnx", dynamo, opset)
    ctx = PassContext(target_opset=target_opset)

    assert RulePass(RMSNormFusion, ctx)(model).modified

    assert _ops(model)[-1] == "RMSNormalization"
    assert not {"Pow", "ReduceMean", "Sqrt"} & set(_ops(model)), _ops(model)
    assert model.opset_imports[""] == 23
    rms = next(n for n in model.graph if n.op_type == "RMSNormalization")
    assert rms.attributes["axis"].as_int() == 2
    assert rms.attributes["epsilon"].as_float() == pytest.approx(1e-6)
    assert module_path(rms) == "norm"
    assert [e.status for e in ctx.events] == ["applied"]
    with torch.no_grad():
        expected = module(x).numpy()
    np.testing.assert_allclose(_run(model, x.numpy()), expected, atol=1e-5, rtol=1e-4)


REFUSED = [
    pytest.param("llama", 18, "portable", "model opset 18 < 23 (RMSNormalization-23)", id="opset18-not-raised"),
    pytest.param("llama", 23, "ort-cpu", KEPT_ON_ORT_CPU, id="kept-on-ort-cpu"),
    pytest.param("eps_on_rms", 23, "portable", "eps is added to the RMS", id="eps-on-rms"),
]


@pytest.mark.parametrize(("spelling", "opset", "target", "reason"), REFUSED)
def test_rmsnorm_left_alone_with_the_reason(
    spelling: str, opset: int, target: str, reason: str, tmp_path: Path
) -> None:
    model = _export(Net(LlamaRMSNorm(spelling=spelling)), torch.randn(2, 5, 16), tmp_path / "m.onnx", True, opset)
    before = ir.to_proto(model).SerializeToString()
    ctx = PassContext(target=target)

    assert not RulePass(RMSNormFusion, ctx)(model).modified

    assert ir.to_proto(model).SerializeToString() == before
    assert [e.status for e in ctx.events] == ["skipped"]
    assert reason in ctx.events[0].reason


class HandLN(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x - x.mean(-1, keepdim=True)
        return d / torch.sqrt(d.pow(2).mean(-1, keepdim=True) + 1e-5)


def test_layernorm_is_never_an_rmsnorm(tmp_path: Path) -> None:
    """mean(d²) of d = x − mean(x) looks like an RMSNorm of d; it is the LayerNorm fuser's site."""
    model = _export(Net(HandLN()), torch.randn(2, 5, 16), tmp_path / "m.onnx", True, 23)
    ctx = PassContext()

    assert not RulePass(RMSNormFusion, ctx)(model).modified
    assert ctx.events == []
