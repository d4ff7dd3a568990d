"""``normfold convert``: fp16/bf16 with fp32 normalization islands (for GPU backends)."""

from __future__ import annotations

from pathlib import Path

import typer

from normfold.cli._app import command, csv, emit_json, out


@command("convert")
def convert_cmd(
    onnx_path: Path = typer.Argument(..., help="fp32 ONNX model."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the converted model (atomically)."),
    precision: str = typer.Option("fp16", "--precision", help="fp16 | bf16"),
    keep_io_types: bool = typer.Option(False, "--keep-io-types", help="Keep graph inputs/outputs in fp32."),
    fp32_ops: str = typer.Option(
        None, "--fp32-ops", help="Comma-separated op types kept in fp32 (default: the norms and Softmax)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output on stdout."),
) -> None:
    """Convert to fp16/bf16, keeping LayerNorm/GroupNorm/InstanceNorm, norm statistics and Softmax in fp32."""
    from normfold.errors import UsageError
    from normfold.fusers.precision import convert_precision

    if precision not in ("fp16", "bf16"):
        raise UsageError(f"unknown precision {precision!r}; expected fp16 or bf16")
    report = convert_precision(
        onnx_path,
        output,
        precision=precision,  # type: ignore[arg-type]
        keep_io_types=keep_io_types,
        fp32_ops=csv(fp32_ops) or None,
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
