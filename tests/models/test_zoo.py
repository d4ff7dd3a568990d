"""The zoo: every model exports with both exporters and matches eager on ORT CPU; weights are
deterministic and non-trivial; specs match forward."""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from normfold.models import ZOO, seeded_inputs
from normfold.models.zoo import ScratchBatchNorm, ScratchGroupNorm

NAMES = sorted(ZOO)
EXPECTED_NAMES = {
    "lenet_bn",
    "lenet_custom_bn",
    "resnet_basic",
    "mobilenet_dw",
    "convtranspose_decoder",
    "conv1d_bn",
    "transformer_block",
    "unet_resblock",
    "groupnorm_handwritten",
    "instancenorm_style",
}
# exporter → (torch.onnx.export kwargs, opset the file must carry)
EXPORTERS = {
    "dynamo21": ({"dynamo": True, "opset_version": 21}, 21),
    "torchscript17": ({"dynamo": False, "opset_version": 17}, 17),
}


def _norm_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor, float]]:
    """(label, tensor, identity value) for every normalization statistic/affine parameter."""
    for path, sub in module.named_modules():
        if isinstance(sub, (_BatchNorm, _InstanceNorm)):
            if sub.running_var is not None and sub.running_mean is not None:
                yield f"{path}.running_var", sub.running_var, 1.0
                yield f"{path}.running_mean", sub.running_mean, 0.0
            if sub.affine:
                yield f"{path}.weight", sub.weight, 1.0
                yield f"{path}.bias", sub.bias, 0.0
        elif isinstance(sub, (nn.LayerNorm, nn.GroupNorm, ScratchGroupNorm)):
            yield f"{path}.weight", sub.weight, 1.0
            yield f"{path}.bias", sub.bias, 0.0
        elif isinstance(sub, ScratchBatchNorm):
            yield f"{path}.moving_var", sub.moving_var, 1.0
            yield f"{path}.moving_mean", sub.moving_mean, 0.0
            yield f"{path}.gamma", sub.gamma, 1.0
            yield f"{path}.beta", sub.beta, 0.0


def test_registry_holds_the_ten_models() -> None:
    assert set(ZOO) == EXPECTED_NAMES
    assert all(entry.description for entry in ZOO.values())


@pytest.mark.parametrize("exporter", sorted(EXPORTERS))
@pytest.mark.parametrize("name", NAMES)
def test_export_matches_eager_on_ort_cpu(name: str, exporter: str, tmp_path: Path) -> None:
    entry = ZOO[name]
    model = entry.build()
    inputs = seeded_inputs(entry.inputs)
    with torch.inference_mode():
        expected = model(*copy.deepcopy(inputs)).numpy()
    kwargs, opset = EXPORTERS[exporter]
    names = [spec.name for spec in entry.inputs]
    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kwargs["dynamo"]:
            torch.onnx.export(model, inputs, str(path), **kwargs)
        else:
            torch.onnx.export(model, inputs, str(path), input_names=names, output_names=["y"], **kwargs)

    proto = onnx.load(str(path), load_external_data=False)
    assert {o.domain: o.version for o in proto.opset_import}[""] == opset
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == names  # dynamo names them after forward's params
    (got,) = session.run(None, {n: t.numpy() for n, t in zip(names, inputs, strict=True)})
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert np.abs(expected).max() > 1e-2  # a constant-zero output would match anything


@pytest.mark.parametrize("name", NAMES)
def test_build_is_deterministic(name: str) -> None:
    entry = ZOO[name]
    first = entry.build()
    ZOO["lenet_bn" if name != "lenet_bn" else "conv1d_bn"].build()  # RNG use in between must not matter
    second = entry.build()
    sd1, sd2 = first.state_dict(), second.state_dict()
    assert list(sd1) == list(sd2)
    for key in sd1:
        assert torch.equal(sd1[key], sd2[key]), key
    for (label, t1, _), (_, t2, _) in zip(_norm_tensors(first), _norm_tensors(second), strict=True):
        assert torch.equal(t1, t2), label  # also covers the plain-attribute stats not in state_dict
    inputs = seeded_inputs(entry.inputs)
    assert all(torch.equal(a, b) for a, b in zip(inputs, seeded_inputs(entry.inputs), strict=True))
    with torch.inference_mode():
        assert torch.equal(first(*inputs), second(*inputs))


@pytest.mark.parametrize("name", NAMES)
def test_norm_params_are_non_trivial(name: str) -> None:
    model = ZOO[name].build()
    found = list(_norm_tensors(model))
    assert found, f"{name} has no normalization layer"
    for label, tensor, identity in found:
        assert not torch.all(tensor == identity), f"{label} is all {identity}"
        assert tensor.unique().numel() > 1, f"{label} is constant"
        if label.endswith("var"):
            assert torch.all(tensor > 0), label
    # every norm-like module is covered by the check above (a new norm type must be added there)
    covered = (_BatchNorm, _InstanceNorm, nn.LayerNorm, nn.GroupNorm, ScratchBatchNorm, ScratchGroupNorm)
    for path, sub in model.named_modules():
        if not list(sub.children()) and "norm" in type(sub).__name__.lower():
            assert isinstance(sub, covered), f"{path}: {type(sub).__name__} not checked"


@pytest.mark.parametrize("name", NAMES)
def test_built_model_is_in_eval_mode_and_small(name: str) -> None:
    model = ZOO[name].build()
    assert not any(m.training for m in model.modules())
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert size < 512 * 1024


@pytest.mark.parametrize("name", NAMES)
def test_input_specs_match_forward(name: str) -> None:
    entry = ZOO[name]
    model = entry.build()
    params = list(inspect.signature(model.forward).parameters)
    assert params == [spec.name for spec in entry.inputs]
    inputs = seeded_inputs(entry.inputs)
    assert [tuple(t.shape) for t in inputs] == [spec.shape for spec in entry.inputs]
    with torch.inference_mode():
        out = model(*inputs)
    assert torch.isfinite(out).all()


def test_lenet_bn_uses_batch_two_for_bn1d() -> None:
    assert ZOO["lenet_bn"].inputs[0].shape == (2, 1, 28, 28)
    assert any(isinstance(m, nn.BatchNorm1d) for m in ZOO["lenet_bn"].build().modules())


def test_lenet_custom_bn_matches_lenet_bn_with_same_values() -> None:
    """The scratch BN keeps stats as plain attributes (not in state_dict) and computes what BN computes."""
    custom, reference = ZOO["lenet_custom_bn"].build(), ZOO["lenet_bn"].build()
    scratch = [m for m in custom.modules() if isinstance(m, ScratchBatchNorm)]
    assert len(scratch) == 4
    state = custom.state_dict()
    assert not any("moving" in key for key in state)
    for m in scratch:
        assert isinstance(m.moving_var, torch.Tensor)
        assert not dict(m.named_buffers()) and set(dict(m.named_parameters())) == {"gamma", "beta"}
    # copy every parameter and BN statistic into the nn.BatchNorm net and compare outputs
    with torch.no_grad():
        ref_bns = [m for m in reference.modules() if isinstance(m, _BatchNorm)]
        for bn, sbn in zip(ref_bns, scratch, strict=True):
            bn.weight.copy_(sbn.gamma.flatten())
            bn.bias.copy_(sbn.beta.flatten())
            bn.running_mean.copy_(sbn.moving_mean.flatten())
            bn.running_var.copy_(sbn.moving_var.flatten())
        for key, value in reference.state_dict().items():
            if key in state:  # the conv/linear weights; BN keys differ (weight vs gamma)
                value.copy_(state[key])
        x = seeded_inputs(ZOO["lenet_bn"].inputs)[0]
        torch.testing.assert_close(custom(x), reference(x), atol=1e-6, rtol=1e-5)


def test_scratch_group_norm_matches_nn_group_norm() -> None:
    torch.manual_seed(0)
    scratch, builtin = ScratchGroupNorm(4, 8), nn.GroupNorm(4, 8)
    with torch.no_grad():
        scratch.weight.uniform_(0.5, 1.5)
        scratch.bias.uniform_(-0.5, 0.5)
        builtin.weight.copy_(scratch.weight)
        builtin.bias.copy_(scratch.bias)
    x = torch.randn(2, 8, 5, 5) * 3 + 1
    torch.testing.assert_close(scratch(x), builtin(x), atol=1e-5, rtol=1e-5)


def test_scratch_batch_norm_training_updates_moving_stats() -> None:
    bn = ScratchBatchNorm(3, num_dims=4).train()
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    y = bn(x)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(bn.moving_mean.flatten(), 0.1 * x.mean(dim=(0, 2, 3)), atol=1e-5)
