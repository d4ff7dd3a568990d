"""Helpers for the folding tests: torch exports, hand-built graphs, ORT runs, eager comparison."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

ATOL, RTOL = 1e-5, 1e-4


def randomize_bn(bn: nn.modules.batchnorm._BatchNorm, seed: int = 0) -> nn.Module:
    """Non-trivial statistics and affine parameters, so a wrong fold cannot hide."""
    gen = torch.Generator().manual_seed(seed)
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.rand(c, generator=gen) * 2 - 1)
        bn.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
        bn.weight.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
        bn.bias.copy_(torch.rand(c, generator=gen) * 2 - 1)
    return bn


def export_legacy(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, opset: int = 17) -> Path:
    """The TorchScript exporter *without* its own constant folding, so Conv+BN stays unfolded.

    normfold.exporter.export(exporter="torchscript") folds Conv+BN itself (do_constant_folding=True);
    the tests need the BN left in place to exercise our rules on legacy-style graphs (names like
    ``/bn/BatchNormalization``, Identity-aliased parameters, opset 17 with ``training_mode``).
    """
    module.eval()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, do_constant_folding=False)
    return path


def export_dynamo(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path) -> Path:
    """normfold's exporter: dynamo at opset 21, ``optimize=False`` plus constant folding only."""
    from normfold.exporter import export

    export(module.eval(), args, path, exporter="dynamo", opset=21)
    return path


def make_model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    inits: dict[str, np.ndarray],
    opset: int = 17,
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def vi(name: str, shape: list[int], dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def run_ort(model: onnx.ModelProto | Path | str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def ops(model: onnx.ModelProto | Path | str) -> dict[str, int]:
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    return dict(Counter(n.op_type for n in proto.graph.node if n.op_type not in ("Constant", "Identity")))


def assert_close(actual: np.ndarray, expected: np.ndarray | torch.Tensor) -> None:
    exp = expected.detach().numpy() if isinstance(expected, torch.Tensor) else expected
    np.testing.assert_allclose(actual, exp, atol=ATOL, rtol=RTOL)


def bn_arrays(c: int, seed: int = 0, dtype: type[np.generic] = np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "gamma": rng.uniform(0.5, 2.0, c).astype(dtype),
        "beta": rng.uniform(-1, 1, c).astype(dtype),
        "mean": rng.uniform(-1, 1, c).astype(dtype),
        "var": rng.uniform(0.5, 2.0, c).astype(dtype),
    }


def bn_numpy(y: np.ndarray, p: dict[str, np.ndarray], axis: int = 1, eps: float = 1e-5) -> np.ndarray:
    shape = [1] * y.ndim
    shape[axis] = -1
    s = (p["gamma"] / np.sqrt(p["var"].astype(np.float64) + eps)).reshape(shape)
    return ((y - p["mean"].reshape(shape)) * s + p["beta"].reshape(shape)).astype(np.float32)
