"""optimize(): pass selection, loading errors, the report, atomic output, and verification."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from fold_helpers import export_legacy, ops, randomize_bn, run_ort
from torch import nn

from normfold.errors import FusionError, OnnxLoadError, UsageError
from normfold.fusers import PASS_REGISTRY, NormfoldPass, default_passes, optimize
from normfold.fusers._graph import const_array
from normfold.fusers.base import DISABLED_REASON


@pytest.fixture(scope="module")
def conv_bn_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        randomize_bn(nn.BatchNorm2d(4), 1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        randomize_bn(nn.BatchNorm2d(4), 2),
    )
    return export_legacy(model.eval(), (torch.randn(1, 3, 8, 8),), tmp_path_factory.mktemp("m") / "m.onnx")


def test_default_order_and_report(conv_bn_model: Path, tmp_path: Path) -> None:
    names = default_passes()
    assert names[0] == "cleanup" and names[-2:] == ["standalone_bn", "lower_norms"]
    report = optimize(conv_bn_model, tmp_path / "o.onnx")
    assert report.output == str(tmp_path / "o.onnx") and report.passes == names
    assert report.ops_before == {"BatchNormalization": 2, "Conv": 2, "Relu": 1}
    assert report.ops_after == {"Conv": 2, "Relu": 1}
    assert report.initializer_bytes_after < report.initializer_bytes_before
    assert set(report.pass_seconds) == set(names) and all(t >= 0 for t in report.pass_seconds.values())
    rule = report.rules["fuse_bn_into_conv"]
    assert (rule.matched, rule.applied, rule.skipped) == (2, 2, 0)
    assert [e.nodes for e in rule.events] == [
        ("/0/Conv", "/1/BatchNormalization"),
        ("/3/Conv", "/4/BatchNormalization"),
    ]
    v = report.verification
    assert v is not None and v.passed and v.atol == 1e-5 and v.rtol == 1e-4 and v.inputs == {"input.1": [1, 3, 8, 8]}
    data = json.loads(report.to_json())
    assert data["rules"]["fuse_bn_into_conv"]["applied"] == 2 and data["verification"]["passed"] is True
    assert [p.name for p in tmp_path.iterdir()] == ["o.onnx"]  # atomic write leaves no temp file


def test_model_proto_in_memory_and_no_verify(conv_bn_model: Path) -> None:
    report = optimize(onnx.load(str(conv_bn_model)), passes=["fuse_bn_into_conv"], verify=False)
    assert report.output is None and report.verification is None and report.source == "<ModelProto>"
    assert report.passes == ["fuse_bn_into_conv"] and report.ops_after == {"Conv": 2, "Relu": 1}


def test_passes_as_comma_string_and_unknown_names(conv_bn_model: Path) -> None:
    assert optimize(conv_bn_model, passes="fold_constants, standalone_bn").ops_after["BatchNormalization"] == 2
    with pytest.raises(UsageError, match=r"unknown pass name\(s\) \['fold_bn'\]; valid names are: .*fuse_bn_into_conv"):
        optimize(conv_bn_model, passes=["fold_bn"])


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(OnnxLoadError, match="not found"):
        optimize(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not protobuf \xff\xfe")
    with pytest.raises(OnnxLoadError):
        optimize(bad, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


class _CorruptConvBias(NormfoldPass):
    """Test-only broken rule: adds 1 to every Conv bias (a 'fold' with a sign error, say)."""

    name = "_test_corrupt_bias"
    honor_disabled = True

    def run(self, model: ir.Model) -> bool:
        changed = False
        for node in list(model.graph):
            if node.op_type != "Conv" or len(node.inputs) < 3 or node.metadata_props.get("corrupted"):
                continue
            if self.honor_disabled and self.site_disabled(node.name or ""):
                self.skipped([node], DISABLED_REASON)
                continue
            bias = const_array(node.inputs[2])
            assert bias is not None
            corrupt = ir.Value(name=f"{node.name}_corrupt", const_value=ir.tensor(bias + 1))
            model.graph.register_initializer(corrupt)
            node.replace_input_with(2, corrupt)
            node.metadata_props["corrupted"] = "1"
            self.applied([node], "corrupted the bias")
            changed = True
        return changed


class _CorruptIgnoringDisable(_CorruptConvBias):
    name = "_test_corrupt_bias_stubborn"
    honor_disabled = False


@pytest.fixture
def corrupt_passes() -> Iterator[None]:
    for cls in (_CorruptConvBias, _CorruptIgnoringDisable):
        PASS_REGISTRY[cls.name] = cls
    yield
    for cls in (_CorruptConvBias, _CorruptIgnoringDisable):
        PASS_REGISTRY.pop(cls.name, None)


@pytest.mark.usefixtures("corrupt_passes")
def test_verification_disables_the_broken_rule_and_retries(conv_bn_model: Path, tmp_path: Path) -> None:
    dst = tmp_path / "o.onnx"
    report = optimize(conv_bn_model, dst, passes=["fuse_bn_into_conv", "_test_corrupt_bias"])
    v = report.verification
    assert v is not None and v.passed and v.attempts == 3
    assert [(e.rule, e.nodes) for e in v.disabled] == [
        ("_test_corrupt_bias", ("/0/Conv",)),
        ("_test_corrupt_bias", ("/3/Conv",)),
    ]
    assert all("failed verification" in e.reason for e in v.disabled)
    assert report.rules["_test_corrupt_bias"].applied == 0 and report.rules["fuse_bn_into_conv"].applied == 2
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(
        run_ort(dst, {"input.1": x})[0], run_ort(conv_bn_model, {"input.1": x})[0], atol=1e-5, rtol=1e-4
    )
    assert ops(dst) == {"Conv": 2, "Relu": 1}


@pytest.mark.usefixtures("corrupt_passes")
def test_unisolatable_failure_raises_and_writes_nothing(conv_bn_model: Path, tmp_path: Path) -> None:
    dst = tmp_path / "o.onnx"
    with pytest.raises(FusionError, match=r"rules involved: \['_test_corrupt_bias_stubborn'\], nodes: \['/0/Conv'"):
        optimize(conv_bn_model, dst, passes=["_test_corrupt_bias_stubborn"])
    assert list(tmp_path.iterdir()) == []


def test_loose_tolerance_is_honoured(conv_bn_model: Path) -> None:
    report = optimize(conv_bn_model, atol=1e-3, rtol=0.0, seed=7)
    assert report.verification is not None and report.verification.atol == 1e-3 and report.verification.seed == 7
