"""``normfold convert``: fp16/bf16 with fp32 normalization islands (for GPU backends)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from normfold.cli._app import command, csv, emit_json, out

if TYPE_CHECKING:
    from normfold.fusers.precision import AutoPrecision


@command("convert")
def convert_cmd(
    onnx_path: Path = typer.Argument(..., help="fp32 ONNX model."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the converted model (atomically)."),
    precision: str = typer.Option("fp16", "--precision", help="fp16 | bf16"),
    keep_io_types: bool = typer.Option(False, "--keep-io-types", help="Keep graph inputs/outputs in fp32."),
    fp32_ops: str = typer.Option(
        None, "--fp32-ops", help="Comma-separated op types kept in fp32 (default: the norms and Softmax)."
    ),
    auto_backend: str = typer.Option(
        None,
        "--auto",
        help="Choose the fp32 islands from per-tensor errors measured on this GPU backend (ort-cuda | ort-trt).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the random inputs used by --auto."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output on stdout."),
) -> None:
    """Convert to fp16/bf16, keeping LayerNorm/GroupNorm/InstanceNorm, norm statistics and Softmax in fp32."""
    from normfold.errors import UsageError
    from normfold.fusers.precision import convert_precision, validate_fp32_ops

    if precision not in ("fp16", "bf16"):
        raise UsageError(f"unknown precision {precision!r}; expected fp16 or bf16")
    ops = csv(fp32_ops) or None
    if fp32_ops is not None and not ops:
        raise UsageError("--fp32-ops is empty; give op types such as LayerNormalization,Softmax")
    validate_fp32_ops(ops)
    auto = _auto_precision(onnx_path, auto_backend, precision, seed) if auto_backend else None
    report = convert_precision(
        onnx_path,
        output,
        precision=precision,  # type: ignore[arg-type]
        keep_io_types=keep_io_types,
        fp32_ops=ops,
        auto=auto,
    )
    if as_json:
        emit_json(report.to_dict())
        return
    out.print(
        f"wrote {output} ({precision}): {len(report.fp32_islands)} fp32 islands, "
        f"{report.casts_inserted} Casts inserted, {report.tensors_converted} tensors converted"
    )
    for issue in report.issues:
        out.print(f"[yellow]note:[/] {issue.to_dict()}")


def _auto_precision(onnx_path: Path, backend_name: str, precision: str, seed: int) -> AutoPrecision:
    """AutoPrecision whose errors come from the GPU backend's own session (deployed options included;
    ORT CPU widens fp16 and would hide them)."""
    from normfold.errors import UsageError
    from normfold.fusers.precision import AutoPrecision
    from normfold.io import load_onnx
    from normfold.runtime._gpu_precision import ort_tensor_errors
    from normfold.runtime.base import SessionOptions
    from normfold.runtime.onnxruntime import create_session, tensor_metas
    from normfold.runtime.onnxruntime_gpu import OrtGpuBackend
    from normfold.runtime.registry import get_backend
    from normfold.runtime.run import random_feeds

    backend = get_backend(backend_name)
    if not isinstance(backend, OrtGpuBackend):
        raise UsageError(f"--auto needs a GPU ONNX Runtime backend (ort-cuda or ort-trt), got {backend_name!r}")
    backend.ensure_available(precision)
    metas = tensor_metas(create_session(onnx_path, ["CPUExecutionProvider"]).get_inputs())
    feeds = random_feeds(metas, seed=seed, dynamic_dim=1)
    options = SessionOptions(precision=precision)
    return AutoPrecision(ort_tensor_errors(load_onnx(onnx_path), feeds, backend=backend.name, options=options))
