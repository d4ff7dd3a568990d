"""Per-target norm lowering: GroupNormalization-21 → the InstanceNormalization form on ORT, kept elsewhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from fold_helpers import assert_close, make_model, ops, run_ort, vi
from onnx import TensorProto, helper
from torch import nn
from typer.testing import CliRunner

from normfold.cli import app
from normfold.errors import UsageError
from normfold.exporter.provenance import module_path
from normfold.fusers import optimize
from normfold.fusers.lowering import TARGETS

IN_FORM_OPS = {"Reshape": 2, "InstanceNormalization": 1, "Mul": 1, "Add": 1}  # ort-cuda: affine as Mul → Add
CPU_FORM_OPS = {"Reshape": 2, "InstanceNormalization": 1, "BatchNormalization": 1}  # ort-cpu: affine as one BN


def gn_model(shape: list[int], groups: int, *, seed: int = 0, affine: bool = True, dtype: int = TensorProto.FLOAT):
    """One GroupNormalization-21 (module path ``block.norm``) and the torch reference for its input."""
    rng = np.random.default_rng(seed)
    c = shape[1]
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    scale = rng.uniform(0.5, 1.5, c) if affine else np.ones(c)
    bias = rng.uniform(-0.5, 0.5, c) if affine else np.zeros(c)
    node = helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=groups, epsilon=1e-5, name="gn")
    node.metadata_props.add(key="normfold.module_path", value="block.norm")
    model = make_model(
        [node],
        [vi("x", shape, dtype)],
        [vi("y", shape, dtype)],
        {"s": scale.astype(np_dtype), "b": bias.astype(np_dtype)},
        opset=21,
    )
    return model, scale, bias


def eager(x: np.ndarray, groups: int, scale: np.ndarray, bias: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(x.astype(np.float64))
    return nn.functional.group_norm(t, groups, torch.from_numpy(scale), torch.from_numpy(bias), 1e-5).float()


@pytest.mark.parametrize(
    ("shape", "groups", "affine", "target"),
    [
        ([2, 8, 5, 6], 4, True, "ort-cpu"),
        ([1, 6, 10], 3, True, "ort-cpu"),
        ([1, 4, 3, 4, 2], 2, True, "ort-cuda"),
        ([2, 8, 4, 4], 8, False, "ort-cpu"),
    ],
)
def test_ort_targets_lower_groupnorm_to_instance_norm(
    shape: list[int], groups: int, affine: bool, target: str, tmp_path: Path
) -> None:
    model, scale, bias = gn_model(shape, groups, affine=affine)
    report = optimize(model, tmp_path / "o.onnx", target=target)
    want = (
        (CPU_FORM_OPS if target == "ort-cpu" else IN_FORM_OPS) if affine else {"Reshape": 2, "InstanceNormalization": 1}
    )
    assert ops(tmp_path / "o.onnx") == want and report.target == target
    (event,) = report.rules["lower_norms"].events
    assert event.status == "applied" and "InstanceNormalization form" in event.reason and event.nodes == ("gn",)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32) * 3 + 1
    assert_close(run_ort(tmp_path / "o.onnx", {"x": x})[0], eager(x, groups, scale, bias))
    lowered = onnx.load(str(tmp_path / "o.onnx")).graph.node
    assert {module_path(n) for n in lowered} == {"block.norm"}  # per-layer compare still finds the module


@pytest.mark.parametrize("target", ["portable", "trt", "ort-trt"])
def test_other_targets_keep_groupnormalization_with_the_reason(target: str) -> None:
    model, _, _ = gn_model([1, 8, 4, 4], 2)
    report = optimize(model, target=target)
    assert report.ops_after == {"GroupNormalization": 1}
    (event,) = report.rules["lower_norms"].events
    assert event.status == "skipped" and event.reason.startswith(f"kept as GroupNormalization-21 on {target}")


def test_groupnorm_that_cannot_be_lowered_exactly_is_kept_with_the_reason() -> None:
    fp16, _, _ = gn_model([1, 8, 4, 4], 2, dtype=TensorProto.FLOAT16)
    report = optimize(fp16, target="ort-cpu", verify=False)
    assert report.ops_after == {"GroupNormalization": 1}
    assert "FLOAT16 would change GN-21's float32 statistics" in report.rules["lower_norms"].events[0].reason
    model, _, _ = gn_model([1, 8, 4, 4], 2)
    model.graph.input.append(vi("s", [8]))  # the scale becomes a graph input: not a constant any more
    model.graph.initializer.pop(0)
    report = optimize(model, target="ort-cpu")
    assert report.ops_after == {"GroupNormalization": 1}
    assert "the scale is not a constant of C=8 values" in report.rules["lower_norms"].events[0].reason


def test_layernorm_is_kept_and_the_decision_reported() -> None:
    node = helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], axis=-1, name="ln")
    model = make_model(
        [node], [vi("x", [2, 3, 8])], [vi("y", [2, 3, 8])], {"s": np.ones(8, np.float32), "b": np.zeros(8, np.float32)}
    )
    report = optimize(model, target="ort-cpu")
    assert report.ops_after == {"LayerNormalization": 1}
    assert report.rules["lower_norms"].events[0].reason == (
        "kept as LayerNormalization on ort-cpu: ORT's CPU EP has a native kernel for it"
    )


def test_torch_groupnorm_dynamo_export_lowered_for_ort_cpu(tmp_path: Path) -> None:
    from normfold.exporter import export

    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU()).eval()
    with torch.no_grad():
        module[1].weight.uniform_(0.5, 1.5)
        module[1].bias.uniform_(-0.5, 0.5)
    x = torch.randn(1, 4, 6, 6)
    export(module, (x,), tmp_path / "m.onnx", opset=21)
    assert ops(tmp_path / "m.onnx")["GroupNormalization"] == 1
    report = optimize(tmp_path / "m.onnx", tmp_path / "o.onnx", target="ort-cpu")
    assert "GroupNormalization" not in report.ops_after and report.ops_after["InstanceNormalization"] == 1
    assert_close(run_ort(tmp_path / "o.onnx", {"input": x.numpy()})[0], module(x))


def test_unknown_target_is_a_usage_error(tmp_path: Path) -> None:
    model, _, _ = gn_model([1, 8, 4, 4], 2)
    with pytest.raises(UsageError, match="unknown target 'gpu'; valid targets are: " + ", ".join(TARGETS)):
        optimize(model, target="gpu")
    onnx.save(model, str(tmp_path / "m.onnx"))
    res = CliRunner().invoke(
        app, ["optimize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "--target", "gpu"]
    )
    assert res.exit_code == 2 and "unknown target 'gpu'" in res.output and not (tmp_path / "o.onnx").exists()
    res = CliRunner().invoke(
        app, ["optimize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "--target", "ort-cpu"]
    )
    assert res.exit_code == 0 and "target: ort-cpu" in res.output and ops(tmp_path / "o.onnx") == CPU_FORM_OPS


@pytest.mark.parametrize(("gamma", "beta", "want"), [(1.0, 0.3, {"Add": 1}), (0.7, 0.0, {"Mul": 1})])
def test_ort_cpu_affine_with_an_identity_part_keeps_the_single_op(gamma: float, beta: float, want: dict) -> None:
    """The BatchNormalization affine replaces Mul → Add only; a lone Mul or Add stays one node."""
    model, _, _ = gn_model([1, 8, 4, 4], 2)
    for init, value in zip(model.graph.initializer, (gamma, beta), strict=True):
        init.CopyFrom(onnx.numpy_helper.from_array(np.full(8, value, np.float32), init.name))
    report = optimize(model, target="ort-cpu")
    assert report.ops_after == {"Reshape": 2, "InstanceNormalization": 1, **want}
    assert report.verification is not None and report.verification.passed
