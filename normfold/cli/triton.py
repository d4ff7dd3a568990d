"""``normfold triton``: write a Triton Inference Server model repository for one ONNX model."""

from __future__ import annotations

from pathlib import Path

import typer

from normfold.cli._app import command, emit_json, out


@command("triton")
def triton_cmd(
    onnx_path: Path = typer.Argument(..., help="ONNX model to serve."),
    repo: Path = typer.Option(..., "--repo", help="Model repository root (tritonserver --model-repository)."),
    name: str = typer.Option(None, "--name", help="Model name (directory); defaults to the file's stem."),
    platform: str = typer.Option("onnxruntime", "--platform", help="onnxruntime | tensorrt"),
    max_batch: int = typer.Option(0, "--max-batch", help="Triton max_batch_size; 0 disables batching."),
    dynamic_batching: bool = typer.Option(False, "--dynamic-batching", help="Enable Triton's dynamic batcher."),
    instances: int = typer.Option(1, "--instances", help="Model instances (instance_group count)."),
    kind: str = typer.Option("auto", "--kind", help="Instance kind: auto | cpu | gpu."),
    fp16: bool = typer.Option(
        False, "--fp16", help="onnxruntime: TensorRT accelerator in FP16; tensorrt: build the engine in fp16."
    ),
    trt_accelerator: bool = typer.Option(
        False, "--trt-accelerator", help="ORT backend: run through its TensorRT execution accelerator."
    ),
    engine: Path = typer.Option(None, "--engine", help="tensorrt platform: a prebuilt serialized engine (plan)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing, non-empty model directory."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output on stdout."),
) -> None:
    """Write REPO/NAME/{config.pbtxt, 1/model.onnx|model.plan}; the tensorrt platform builds a plan on a GPU."""
    from rich.markup import escape

    from normfold.io import check_output
    from normfold.serve.triton import write_triton_repo

    check_output(repo, kind="dir", inputs=[onnx_path, engine], flag="--repo")
    report = write_triton_repo(
        onnx_path,
        repo,
        name=name,
        platform=platform,  # type: ignore[arg-type]  # validated by the library
        max_batch=max_batch,
        dynamic_batching=dynamic_batching,
        instances=instances,
        kind=kind,  # type: ignore[arg-type]  # validated by the library
        fp16=fp16,
        trt_accelerator=trt_accelerator,
        engine_path=engine,
        build_engine=platform == "tensorrt" and engine is None,
        overwrite=overwrite,
    )
    if as_json:
        emit_json(report.to_dict())
        return
    tensors = ", ".join(f"{t.name}:{t.data_type}{list(t.dims)}" for t in report.inputs)
    out.print(
        escape(f"wrote {report.model_dir} ({report.platform}, max_batch_size {report.max_batch}; inputs {tensors})")
    )
    for note in report.notes:
        out.print(f"note: {note}", markup=False, highlight=False)
    out.print(f"serve: tritonserver --model-repository={report.repo_dir.resolve()}", markup=False, highlight=False)
