"""The published worked example (../shared/golden) reproduced by eager and by ORT through normfold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from normfold.exporter import export
from normfold.runtime import get_backend
from normfold.runtime.eager import run_eager

# A vendored copy, so the oracle is always there; the published original lives in ../shared/golden.
GOLDEN = Path(__file__).parent / "data" / "norm_worked_example.json"
PUBLISHED = Path(__file__).resolve().parents[2] / "shared" / "golden" / "norm_worked_example.json"


def _golden() -> dict:
    return json.loads(GOLDEN.read_text())


def test_vendored_copy_matches_the_published_example() -> None:
    if not PUBLISHED.exists():
        pytest.skip(f"published original not beside this checkout ({PUBLISHED})")
    assert json.loads(PUBLISHED.read_text()) == _golden()


def _modules(x: torch.Tensor, eps: float) -> dict[str, nn.Module]:
    bn = nn.BatchNorm2d(4, eps=eps, affine=False)
    # Inference-mode BN whose running statistics are the batch statistics (biased variance).
    bn.running_mean.copy_(x.mean(dim=(0, 2, 3)))
    bn.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))
    return {
        "batch_norm": bn,
        "layer_norm": nn.LayerNorm(list(x.shape[1:]), eps=eps, elementwise_affine=False),
        "instance_norm": nn.InstanceNorm2d(4, eps=eps, affine=False),
        "group_norm_G2": nn.GroupNorm(2, 4, eps=eps, affine=False),
    }


@pytest.mark.parametrize("kind", ["batch_norm", "layer_norm", "instance_norm", "group_norm_G2"])
def test_golden_values_eager_and_ort(kind: str, tmp_path: Path) -> None:
    g = _golden()
    x = torch.tensor(g["x"], dtype=torch.float32)
    module = _modules(x, g["epsilon"])[kind].eval()
    expected = np.array(g["expected_sample0"][kind], dtype=np.float32)
    atol = 2e-3  # values are published to three decimals

    eager = run_eager(module, [x])[0]
    np.testing.assert_allclose(eager[0], expected, atol=atol, rtol=0)

    res = export(module, (x,), tmp_path / f"{kind}.onnx", input_names=["x"])
    with get_backend("ort-cpu").load(res.path) as runner:
        got = runner.infer({"x": x.numpy()})[runner.output_names[0]]
    np.testing.assert_allclose(got[0], expected, atol=atol, rtol=0)
    np.testing.assert_allclose(got, eager, atol=1e-5, rtol=1e-4)


def test_golden_statistics() -> None:
    g = _golden()
    x = torch.tensor(g["x"], dtype=torch.float64)
    assert x[:, 0].mean().item() == pytest.approx(g["batch_stats_channel0"]["mean"], abs=1e-3)
    assert x[:, 0].var(unbiased=False).item() == pytest.approx(g["batch_stats_channel0"]["var"], abs=1e-3)
    assert x[0].var(unbiased=False).item() == pytest.approx(g["layer_stats_sample0"]["var"], abs=1e-3)
    assert x[0, :2].var(unbiased=False).item() == pytest.approx(g["group_stats_sample0_group0_G2"]["var"], abs=1e-3)
