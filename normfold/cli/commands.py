"""Foundation commands: backends, zoo, export, run, compare."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape

from normfold.cli._app import EXIT_CHECK_FAILED, command, csv, emit_json, out
from normfold.cli._render import backends_table, compare_table
from normfold.errors import UsageError
from normfold.io import check_output

if TYPE_CHECKING:
    from normfold.models.loader import LoadedModel

INPUT_HELP = "NAME:SHAPE[:DTYPE], e.g. x:1x3x224x224 (repeatable). Overrides the model's example input shapes."


def _load(ref: str, weights: str | None, inputs: list[str] | None, seed: int | None = None) -> LoadedModel:
    from normfold.models.loader import load_model, parse_input_spec

    specs = [parse_input_spec(s) for s in inputs] if inputs else None
    return load_model(ref, weights=weights, inputs=specs, seed=seed)


def ref_file(ref: str) -> Path | None:
    """The ``.py`` file a ``path/to/file.py:factory`` reference reads (an input no output may overwrite)."""
    target, sep, _ = ref.rpartition(":")
    return Path(target) if sep and (target.endswith(".py") or "/" in target) else None


@command("backends")
def backends_cmd(as_json: bool = typer.Option(False, "--json", help="Machine-readable output on stdout.")) -> None:
    """Each backend, whether it can run here and, if not, exactly why."""
    from normfold.runtime import list_backends

    statuses = list_backends()
    if as_json:
        emit_json({"backends": [s.to_dict() for s in statuses]})
    else:
        out.print(backends_table(statuses))


@command("zoo")
def zoo_cmd(as_json: bool = typer.Option(False, "--json", help="Machine-readable output on stdout.")) -> None:
    """The built-in models with parameter counts and input shapes."""
    from rich.table import Table

    from normfold.models import ZOO

    rows: list[dict[str, Any]] = []
    for entry in ZOO.values():
        module = entry.build()
        params = sum(p.numel() for p in module.parameters())
        rows.append(
            {
                "name": entry.name,
                "params": params,
                "inputs": [s.describe() for s in entry.inputs],
                "description": entry.description,
            }
        )
    if as_json:
        emit_json({"models": rows})
        return
    table = Table(title="normfold zoo (use as zoo:NAME)")
    for col in ("name", "params", "inputs", "description"):
        table.add_column(col, justify="right" if col == "params" else "left", overflow="fold")
    for r in rows:
        table.add_row(r["name"], f"{r['params']:,}", " ".join(r["inputs"]), r["description"])
    out.print(table)


@command("export")
def export_cmd(
    model_ref: str = typer.Argument(..., help="zoo:NAME, path/to/file.py:factory or package.module:factory"),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the ONNX file."),
    inputs: list[str] = typer.Option(None, "--input", help=INPUT_HELP),
    weights: str = typer.Option(None, "--weights", help="state_dict checkpoint, loaded strictly (weights_only)."),
    opset: int = typer.Option(21, "--opset", help="ONNX opset; the result must have exactly this opset."),
    dynamic_batch: bool = typer.Option(False, "--dynamic-batch", help="Make dimension 0 of every input dynamic."),
    norm_export: str = typer.Option("native", "--norm-export", help="native | decomposed | custom"),
    exporter: str = typer.Option("dynamo", "--exporter", help="dynamo | torchscript"),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output on stdout."),
) -> None:
    """Export a model to ONNX (atomically), with provenance on every node."""
    from normfold.exporter import export

    check_output(output, inputs=[weights, ref_file(model_ref)], flag="--output")
    loaded = _load(model_ref, weights, inputs)
    result = export(
        loaded, None, output, opset=opset, dynamic_batch=dynamic_batch, norm_export=norm_export, exporter=exporter
    )
    if as_json:
        emit_json(result.to_dict())
        return
    ops = ", ".join(f"{k}×{v}" for k, v in result.op_histogram.items())
    out.print(
        f"wrote {escape(str(result.path))} (opset {result.opset}, {result.exporter}, {result.node_count} nodes: {ops})"
    )
    out.print(
        f"inputs: {escape(', '.join(s.describe() for s in loaded.input_specs))} ({escape(loaded.input_source)}); "
        f"provenance on {result.provenance_coverage:.0%} of nodes"
    )


@command("run")
def run_cmd(
    onnx_path: Path = typer.Argument(..., help="ONNX model to run."),
    backend: str = typer.Option("ort-cpu", "--backend", "-b", help="Backend to run on."),
    inputs_npz: Path = typer.Option(None, "--inputs", help="npz with one array per model input."),
    inputs: list[str] = typer.Option(None, "--input", help=INPUT_HELP + " Needed for dynamic dimensions."),
    seed: int = typer.Option(None, "--seed", help="Seed of the random inputs used without --inputs (default 0)."),
    output: Path = typer.Option(None, "--output", "-o", help="Write the outputs to this .npz (atomically)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output on stdout."),
) -> None:
    """Run one backend on an ONNX model and summarize (or save) its outputs."""
    from normfold.runtime.run import run_onnx

    check_output(output, inputs=[onnx_path, inputs_npz], flag="--output")
    if inputs_npz is not None and seed is not None:
        raise UsageError(f"--seed {seed} would be ignored: the inputs come from {inputs_npz}")
    result = run_onnx(
        onnx_path, backend, inputs_npz=inputs_npz, input_specs=inputs or None, seed=seed or 0, output=output
    )
    if as_json:
        emit_json(result.to_dict())
        return
    from rich.table import Table

    out.print(f"inputs: {escape(result.input_source)}")
    table = Table(title=escape(f"{onnx_path} on {backend}"))
    for col in ("output", "shape", "dtype", "min", "max", "mean"):
        table.add_column(col)
    for s in result.outputs:
        table.add_row(
            escape(s["name"]),
            "x".join(map(str, s["shape"])),
            s["dtype"],
            f"{s['min']:.4g}",
            f"{s['max']:.4g}",
            f"{s['mean']:.4g}",
        )
    out.print(table)
    if output:
        out.print(f"wrote {escape(str(output))}")


@command("compare")
def compare_cmd(
    model_ref: str = typer.Argument(..., help="The eager reference: zoo:NAME, file.py:factory or pkg.mod:factory"),
    onnx_path: Path = typer.Argument(..., help="ONNX model to check against eager."),
    backend: str = typer.Option("ort-cpu", "--backend", "-b", help="Comma-separated backends."),
    atol: float = typer.Option(None, "--atol", help="Absolute tolerance (default per precision)."),
    rtol: float = typer.Option(None, "--rtol", help="Relative tolerance (default per precision)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | tf32 | fp16 | bf16 (tf32 on GPU backends only)."),
    inputs_npz: Path = typer.Option(None, "--inputs", help="npz of real inputs (one array per input name)."),
    inputs: list[str] = typer.Option(None, "--input", help=INPUT_HELP),
    weights: str = typer.Option(None, "--weights", help="state_dict checkpoint, loaded strictly."),
    seed: int = typer.Option(
        None, "--seed", help="Seed of the random inputs used without --inputs (default 0; refused for a factory's own)."
    ),
    per_layer: bool = typer.Option(False, "--per-layer", help="Also diff every layer and name the first divergence."),
    fail_on: str = typer.Option(
        None, "--fail-on", help="layers | outputs: what decides with --per-layer (default: layers at fp32/tf32)."
    ),
    allow_nonfinite: bool = typer.Option(
        False, "--allow-nonfinite", help="Accept NaN/Inf found at the same place on both sides."
    ),
    report: Path = typer.Option(None, "--report", help="Write a report: .json, .md or .html (atomically)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output on stdout."),
) -> None:
    """Diff each backend's outputs against PyTorch eager; exit 1 if any output is out of tolerance."""
    from normfold.numerics import compare

    backends = csv(backend)
    if "torch" in backends:
        raise UsageError(
            "--backend torch is the eager reference that compare checks every backend against; "
            "name the ONNX backends to check (e.g. --backend ort-cpu)"
        )
    check_output(report, inputs=[onnx_path, inputs_npz, weights, ref_file(model_ref)], flag="--report")
    if inputs_npz is not None and seed is not None:
        raise UsageError(f"--seed {seed} would be ignored: the inputs come from {inputs_npz}")
    loaded = _load(model_ref, weights, inputs, seed=seed)
    result = compare(
        loaded,
        onnx_path,
        inputs_npz,
        backends=backends,
        precision=precision,
        atol=atol,
        rtol=rtol,
        per_layer=per_layer,
        model_name=model_ref,
        fail_on=fail_on,
        allow_nonfinite=allow_nonfinite,
    )
    if report:
        from normfold.numerics.reports import write_compare_report

        write_compare_report(result, report)
    if as_json:
        emit_json(result.to_dict())
    else:
        out.print(f"inputs: {escape(result.input_source)}")
        out.print(compare_table(result))
        if per_layer:
            from normfold.cli._render import layers_summary

            layers_summary(result)
        out.print("[green]PASSED[/]" if result.passed else "[red]FAILED[/]")
        if report:
            out.print(f"wrote {escape(str(report))}")
    if not result.passed:
        raise typer.Exit(EXIT_CHECK_FAILED)
