"""``normfold convert`` → ``normfold compare --precision fp16`` on ORT CPU, and the fp32 gate catching it."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
from typer.testing import CliRunner

from normfold.cli import app

runner = CliRunner()


def test_convert_fp16_keeps_norms_fp32_and_compares_at_fp16_tolerance(tmp_path: Path) -> None:
    src, dst = tmp_path / "u.onnx", tmp_path / "u16.onnx"
    assert runner.invoke(app, ["export", "zoo:unet_resblock", "-o", str(src)]).exit_code == 0
    res = runner.invoke(app, ["convert", str(src), "-o", str(dst), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["fp32_islands"]
    model = onnx.load(str(dst))
    producers = {o: n for n in model.graph.node for o in n.output}
    for gn in (n for n in model.graph.node if n.op_type == "GroupNormalization"):
        cast = producers[gn.input[0]]
        assert cast.op_type == "Cast" and cast.attribute[0].i == onnx.TensorProto.FLOAT
    assert runner.invoke(app, ["compare", "zoo:unet_resblock", str(dst), "--precision", "fp16"]).exit_code == 0
    assert runner.invoke(app, ["compare", "zoo:unet_resblock", str(dst)]).exit_code == 1


def test_convert_rejects_unknown_precision(tmp_path: Path) -> None:
    res = runner.invoke(
        app, ["convert", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "--precision", "fp8"]
    )
    assert res.exit_code == 2
    assert res.stderr.startswith("error: unknown precision")
    assert not (tmp_path / "o.onnx").exists()


def test_auto_mode_needs_a_gpu_backend_and_says_why(tmp_path: Path) -> None:
    src = tmp_path / "u.onnx"
    assert runner.invoke(app, ["export", "zoo:conv1d_bn", "-o", str(src)]).exit_code == 0
    res = runner.invoke(app, ["convert", str(src), "-o", str(tmp_path / "o.onnx"), "--auto", "ort-cpu"])
    assert res.exit_code == 2 and "GPU ONNX Runtime backend" in res.stderr
    from normfold.runtime.probe import gpu_reason

    if gpu_reason() is not None:
        res = runner.invoke(app, ["convert", str(src), "-o", str(tmp_path / "o.onnx"), "--auto", "ort-cuda"])
        assert res.exit_code == 3 and "cannot run here" in res.stderr
    assert not (tmp_path / "o.onnx").exists()
