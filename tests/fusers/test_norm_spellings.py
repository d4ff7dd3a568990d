"""More norm spellings (issue 11 §4): Σx/n means, Mul(1/n), Pow(·, -0.5), on real torch exports vs eager."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch
from torch import nn

from normfold.exporter.provenance import module_path
from normfold.fusers.base import PASS_REGISTRY, PassContext, RulePass
from normfold.fusers.groupnorm import GroupNormFusion
from tests.fusers.test_groupnorm import ATOL, RTOL, Wrap, _export, _ops, _run


class SeedGN(nn.Module):
    """The seed's GroupNorm: view (N, G, C/G, H, W), chained single-axis sums / n, ``pow(x − μ, 2)``.

    ``spelling`` picks a look-alike or another exact spelling of the same algebra.
    """

    def __init__(self, channels: int = 8, groups: int = 4, spelling: str = "seed") -> None:
        super().__init__()
        self.groups, self.spelling = groups, spelling
        self.w = nn.Parameter(torch.rand(channels) + 0.5)
        self.b = nn.Parameter(torch.rand(channels) - 0.5)

    def _mean(self, v: torch.Tensor, count: int) -> torch.Tensor:
        if self.spelling == "multi_axis_sum":
            return v.sum((2, 3, 4), keepdim=True) / count
        if self.spelling == "times_reciprocal":
            return v.sum(2, keepdim=True).sum(3, keepdim=True).sum(4, keepdim=True) * (1.0 / count)
        return v.sum(2, keepdim=True).sum(3, keepdim=True).sum(4, keepdim=True) / count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        v = x.view(n, self.groups, c // self.groups, h, w)
        count = (c // self.groups) * h * w
        mean = self._mean(v, count)
        d = v - mean
        sq = d * d if self.spelling == "mul_square" else torch.pow(d, 2)
        var_count = count - 1 if self.spelling == "unbiased" else count
        var = sq.sum(2, keepdim=True).sum(3, keepdim=True).sum(4, keepdim=True) / var_count
        if self.spelling == "eps_on_std":
            y = d / (torch.sqrt(var) + 1e-5)
        elif self.spelling == "pow_minus_half":
            y = d * torch.pow(var + 1e-5, -0.5)
        elif self.spelling == "reciprocal":
            y = d * torch.reciprocal(torch.sqrt(var + 1e-5))
        else:
            y = d / torch.sqrt(var + 1e-5)
        return y.view(n, c, h, w) * self.w[None, :, None, None] + self.b[None, :, None, None]


EXACT = [
    pytest.param("seed", True, id="seed-dynamo21"),
    pytest.param("seed", False, id="seed-legacy21"),
    pytest.param("multi_axis_sum", False, id="multi-axis-sum"),
    pytest.param("times_reciprocal", False, id="sum-times-1/n"),
    pytest.param("mul_square", False, id="mul-square"),
    pytest.param("pow_minus_half", False, id="pow-minus-half"),
    pytest.param("reciprocal", True, id="reciprocal-mul-dynamo"),
]


@pytest.mark.parametrize(("spelling", "dynamo"), EXACT)
def test_sum_over_count_groupnorm_fuses(spelling: str, dynamo: bool, tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = Wrap(SeedGN(spelling=spelling)).eval()
    x = torch.randn(2, 8, 5, 5)
    model = _export(module, x, tmp_path / "m.onnx", dynamo, 21)
    ctx = PassContext()
    PASS_REGISTRY["cleanup"](ctx)(model)  # as in the pipeline: folds legacy's Reciprocal(n) constant subgraph

    assert RulePass(GroupNormFusion, ctx)(model).modified

    assert _ops(model) == ["GroupNormalization"], _ops(model)
    gn = next(n for n in model.graph if n.op_type == "GroupNormalization")
    assert gn.attributes["num_groups"].as_int() == 4
    assert gn.attributes["epsilon"].as_float() == pytest.approx(1e-5)
    assert module_path(gn) == "gn"
    with torch.no_grad():
        expected = module(x).numpy()
    np.testing.assert_allclose(_run(model, x.numpy()), expected, atol=ATOL, rtol=RTOL)


LOOK_ALIKES = [
    pytest.param("unbiased", "Bessel", id="sum-over-n-1"),
    pytest.param("eps_on_std", "eps is added to the standard deviation", id="eps-on-std"),
]


@pytest.mark.parametrize(("spelling", "reason"), LOOK_ALIKES)
def test_sum_over_count_look_alikes_are_refused(spelling: str, reason: str, tmp_path: Path) -> None:
    module = Wrap(SeedGN(spelling=spelling)).eval()
    model = _export(module, torch.randn(2, 8, 5, 5), tmp_path / "m.onnx", False, 21)
    before = ir.to_proto(model).SerializeToString()
    ctx = PassContext()

    assert not RulePass(GroupNormFusion, ctx)(model).modified

    assert ir.to_proto(model).SerializeToString() == before
    reasons = [e.reason for e in ctx.events if e.status == "skipped"]
    assert any(reason in r for r in reasons), reasons
