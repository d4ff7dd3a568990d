"""``benchmark()``: latency of an ONNX model on each backend and batch size.

For every (backend, batch size) the harness

1. builds inputs for that batch size (seeded random, dimension 0 set to the batch size; a static
   batch dimension that differs raises :class:`InputSpecError`),
2. times ``load + validate + first inference`` as ``first_run_ms`` (session creation, engine build or
   ``torch.compile`` happen here and are never counted as steady-state latency),
3. warms up and measures the steady state with :func:`normfold.bench.measure.measure`.

A fresh session is created per batch size, so every row's first run is comparable and GPU backends can
specialize (TensorRT profiles, CUDA graphs) for that shape.

**What is timed.** For ONNX backends the timed call works on feeds validated once beforehand: for
``ort-cpu`` it is ``session.run(output_names, feeds)`` (see :func:`timed_call`), which is what
``benchmarks/bench_overhead.py`` compares against a bare ``session.run`` loop; for runners that override
``infer_impl`` it is ``infer_impl``. Device backends bind
inputs and outputs through IO binding inside their runner; whether host↔device copies are inside the
timed call is the runner's ``copies_included``, copied into each result.

**Threads.** ``threads`` sets ORT's ``intra_op_num_threads`` and, for the ``torch`` baseline,
``torch.set_num_threads`` to the same value so the comparison is like for like. ``threads=None`` uses
``torch.get_num_threads()`` (PyTorch's default: one per physical core, which is also ORT's default),
again for both. ``inter_op_threads`` only matters to ORT's parallel executor and is passed through
unchanged. torch's thread count is restored after the run. Both settings and the thread environment
variables are recorded in the report's ``environment.threads``.

**Torch baseline.** The ``torch`` backend runs ``model`` (a :class:`LoadedModel` or an ``nn.Module``)
on the same inputs, inside ``torch.inference_mode()`` for the whole loop. ``torch_compile=True`` wraps
it in ``torch.compile`` first (a string names the compile backend, default inductor); compilation happens
lazily on the first call, so it lands in ``first_run_ms``. Inputs are not deep-copied
between calls (that copy would be timed); a module that mutates its inputs sees its own changes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from normfold.bench.environment import collect_environment
from normfold.bench.inputs import (
    Shape,
    batch_shapes,
    check_overrides,
    default_batch_size,
    describe_shape,
    onnx_input_metas,
)
from normfold.bench.measure import Measurement, Schedule, measure, timed
from normfold.bench.report import BenchReport, BenchResult
from normfold.bench.stats import summarize
from normfold.errors import InputSpecError, UsageError
from normfold.runtime.base import Runner, SessionOptions, TensorMeta
from normfold.runtime.onnxruntime import GRAPH_OPT_LEVELS, OrtRunner
from normfold.runtime.registry import get_backend, parse_backends
from normfold.runtime.run import random_feeds

log = logging.getLogger(__name__)

#: Backends whose runners honour ``SessionOptions.cuda_graph`` (CUDA graph capture and replay).
CUDA_GRAPH_BACKENDS: tuple[str, ...] = ("ort-cuda", "ort-trt")

Progress = Callable[[str], None]


# --------------------------------------------------------------------------------------------------------
# Options


def resolve_threads(threads: int | None) -> int:
    """The intra-op thread count used for ORT *and* torch (see the module docstring)."""
    if threads is None:
        import torch

        return int(torch.get_num_threads())
    if threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    return int(threads)


def session_options_for(
    backend: str,
    *,
    batch_size: int,
    threads: int,
    inter_op_threads: int | None = None,
    graph_optimization_level: str = "all",
    cuda_graph: bool = False,
    precision: str = "fp32",
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> SessionOptions:
    """The :class:`SessionOptions` one (backend, batch size) is loaded with.

    CUDA graphs are only requested from :data:`CUDA_GRAPH_BACKENDS`; they need IO binding (fixed device
    addresses to replay into) and one static shape per session, which a fresh session per batch size
    provides. ``shapes`` (the feeds' shapes, user ``--input`` sizes included) size the dynamic
    non-batch axes of TensorRT profiles. fp16/bf16 GPU loads convert through
    :func:`~normfold.fusers.precision.model_for_precision`.
    """
    from normfold.fusers.precision import model_for_precision
    from normfold.runtime._gpu_common import dim_values_from_shapes

    use_graph = cuda_graph and backend in CUDA_GRAPH_BACKENDS
    return SessionOptions(
        precision=precision,
        graph_optimization_level=graph_optimization_level,
        intra_op_threads=threads,
        inter_op_threads=inter_op_threads,
        io_binding=True,
        cuda_graph=use_graph,
        batch_sizes=(batch_size,),
        dim_values=dim_values_from_shapes(shapes or {}),
        convert=model_for_precision,
    )


def validate_request(
    backends: Sequence[str],
    *,
    has_model: bool,
    torch_compile: bool | str,
    cuda_graph: bool,
    graph_optimization_level: str,
) -> None:
    """Reject combinations that cannot mean anything, before any session is built."""
    if graph_optimization_level not in GRAPH_OPT_LEVELS:
        levels = ", ".join(GRAPH_OPT_LEVELS)
        raise UsageError(f"unknown graph optimization level {graph_optimization_level!r}; expected one of {levels}")
    if "torch" in backends and not has_model:
        raise UsageError("the torch backend runs the PyTorch model itself; pass it with --model (model=...)")
    if torch_compile and "torch" not in backends:
        raise UsageError(f"--torch-compile applies to the torch backend, which is not among {', '.join(backends)}")
    if cuda_graph and not any(b in CUDA_GRAPH_BACKENDS for b in backends):
        raise UsageError(
            f"--cuda-graph applies to {' and '.join(CUDA_GRAPH_BACKENDS)}, none of which is among {', '.join(backends)}"
        )


# --------------------------------------------------------------------------------------------------------
# Backends


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Set torch's intra-op thread count for the duration, then restore it (it is process-global)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _as_module(model: Any) -> tuple[Any, list[str] | None, list[Shape] | None]:
    """``LoadedModel`` or ``nn.Module`` → (module in eval mode, input names, example shapes)."""
    from torch import nn

    from normfold.models.loader import LoadedModel

    if isinstance(model, LoadedModel):
        return model.module.eval(), list(model.input_names), [tuple(t.shape) for t in model.example_inputs]
    if isinstance(model, nn.Module):
        return model.eval(), None, None
    raise UsageError(f"model must be a LoadedModel or torch.nn.Module, got {type(model).__name__}")


def check_model_inputs(names: list[str] | None, shapes: list[Shape] | None, metas: Sequence[TensorMeta]) -> None:
    """The eager model's example inputs must fit the ONNX inputs (count, rank, static dims but dim 0)."""
    if shapes is None:
        return
    if len(shapes) != len(metas):
        raise InputSpecError(
            f"the --model takes {len(shapes)} input(s) but the ONNX model has {len(metas)} "
            f"({', '.join(m.describe() for m in metas)}); is --model the model this file was exported from?"
        )
    for i, (shape, meta) in enumerate(zip(shapes, metas, strict=True)):
        ok = len(shape) == len(meta.shape) and all(
            not isinstance(d, int) or d == s for j, (d, s) in enumerate(zip(meta.shape, shape, strict=True)) if j > 0
        )
        if not ok:
            label = names[i] if names else f"#{i}"
            raise InputSpecError(
                f"--model input {label} has shape {describe_shape(shape)} but the ONNX input is {meta.describe()}; "
                "is --model the model this file was exported from?"
            )


def _bench_torch(
    model: Any,
    metas: Sequence[TensorMeta],
    feeds: dict[str, np.ndarray],
    schedule: Schedule,
    threads: int,
    torch_compile: bool | str,
) -> tuple[float, float, Measurement]:
    """Time the eager (or compiled) module: returns (load ms, first-infer ms, Measurement)."""
    import torch

    module, names, _ = _as_module(model)
    order = names if names and set(names) == {m.name for m in metas} else [m.name for m in metas]
    args = tuple(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in order)
    with torch_threads(threads), torch.inference_mode():
        fn = module
        load_ns = 0
        if torch_compile:
            compile_backend = torch_compile if isinstance(torch_compile, str) else "inductor"
            fn, load_ns = timed(lambda: torch.compile(module, backend=compile_backend))

        def call() -> Any:
            return fn(*args)

        try:
            _, first_ns = timed(call)
        except Exception as e:  # a module that rejects the ONNX model's inputs: say which inputs it got
            shapes = ", ".join(f"{n}:{describe_shape(a.shape)}" for n, a in zip(order, args, strict=True))
            raise InputSpecError(
                f"the torch model failed on the ONNX model's inputs ({shapes}): {type(e).__name__}: {e}"
            ) from e
        measurement = measure(call, schedule)
    return load_ns / 1e6, first_ns / 1e6, measurement


def timed_call(runner: Runner, feeds: dict[str, np.ndarray]) -> Callable[[], Any]:
    """The zero-argument call the loop times for ``runner`` on already validated ``feeds``.

    For the plain ORT runner this is ``session.run(output_names, feeds)`` bound with
    :func:`functools.partial`: exactly what ``OrtRunner.infer_impl`` does, minus rebuilding the output
    name list and the result dict on every call (about 1 µs of Python, ~1% of a 0.15 ms model on this
    machine), so the harness times what a bare ``session.run`` loop times. Runners that override
    ``infer_impl``, and every device backend (IO binding, CUDA graphs), are timed through ``infer_impl``.
    """
    plain_cpu = runner.backend == "ort-cpu" and not runner.copies_included
    if plain_cpu and isinstance(runner, OrtRunner) and type(runner).infer_impl is OrtRunner.infer_impl:
        return functools.partial(runner.session.run, list(runner.output_names), feeds)
    return functools.partial(runner.infer_impl, feeds)


def _bench_onnx(
    backend: str, onnx_path: Path, feeds: dict[str, np.ndarray], options: SessionOptions, schedule: Schedule
) -> tuple[float, float, Measurement, bool]:
    """Time one ONNX backend: returns (load ms, first-infer ms, Measurement, copies_included)."""
    be = get_backend(backend)
    runner, load_ns = timed(lambda: be.load(onnx_path, options))
    with runner:
        checked = runner.validate(feeds)  # once, outside the timed loop
        call = timed_call(runner, checked)
        _, first_ns = timed(call)
        measurement = measure(call, schedule)
        copies = bool(runner.copies_included)
    return load_ns / 1e6, first_ns / 1e6, measurement, copies


# --------------------------------------------------------------------------------------------------------
# Entry point


def benchmark(
    onnx_path: str | Path,
    *,
    backends: Sequence[str] | str = ("ort-cpu",),
    batch_sizes: Sequence[int] | None = None,
    warmup: int = 10,
    warmup_s: float | None = None,
    iters: int = 200,
    duration_s: float | None = None,
    threads: int | None = None,
    inter_op_threads: int | None = None,
    model: Any = None,
    graph_optimization_level: str = "all",
    torch_compile: bool | str = False,
    cuda_graph: bool = False,
    inputs: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    baseline: str | Path | Mapping[str, Any] | None = None,
    max_regression: float | str = 0.10,
    progress: Progress | None = None,
) -> BenchReport:
    """Benchmark ``onnx_path`` on each backend at each batch size; see the module docstring.

    ``batch_sizes=None`` means the model's own batch size (its static dimension 0, else 1).
    ``warmup_s`` overrides ``warmup`` and ``duration_s`` overrides ``iters`` when given. ``inputs`` maps
    input names to shapes for dynamic dimensions other than the batch. With ``baseline`` (a path to an
    earlier ``--json`` or its dict) the report carries a noise-aware regression check
    (:func:`normfold.bench.regression.check_regression`).

    Raises :class:`UnknownBackendError` for an unknown name, :class:`BackendUnavailableError` when a
    requested backend cannot run here (checked for all before anything runs), :class:`OnnxLoadError` for
    a missing or invalid ONNX file and :class:`InputSpecError` for shapes that do not fit the model.
    """
    names = parse_backends(backends)
    validate_request(
        names,
        has_model=model is not None,
        torch_compile=torch_compile,
        cuda_graph=cuda_graph,
        graph_optimization_level=graph_optimization_level,
    )
    schedule = Schedule(warmup=warmup, warmup_s=warmup_s, iters=iters, duration_s=duration_s)
    path = Path(onnx_path)
    metas = onnx_input_metas(path)
    overrides = {k: tuple(int(d) for d in v) for k, v in (inputs or {}).items()}
    check_overrides(metas, overrides)
    sizes = _batch_sizes(batch_sizes, metas, overrides)
    shapes_by_batch = {b: batch_shapes(metas, b, overrides) for b in sizes}  # static-batch errors up front
    baseline_data, limit = _read_baseline(baseline, max_regression)
    for name in names:
        get_backend(name).ensure_available("fp32")
    model_names: list[str] | None = None
    if model is not None:
        _, model_names, model_shapes = _as_module(model)
        check_model_inputs(model_names, model_shapes, metas)

    run = _RunSettings(
        model, resolve_threads(threads), inter_op_threads, graph_optimization_level, torch_compile, cuda_graph
    )
    report = BenchReport(
        onnx_path=str(path),
        model=getattr(model, "ref", type(model).__name__) if model is not None else None,
        schedule=schedule.to_dict(),
        environment=collect_environment(run.thread_info(names)),
    )
    for name in names:
        for b in sizes:
            feeds = random_feeds(metas, shapes_by_batch[b], seed)
            if progress is not None:
                progress(f"{name} batch {b}: {schedule.describe()}")
            log.info("bench %s at batch %d (%s)", name, b, schedule.describe())
            report.results.append(_measure_one(name, b, path, feeds, schedule, metas, run))
    if baseline_data is not None:
        from normfold.bench.regression import check_regression

        report.regression = check_regression(report, baseline_data, limit)
        if not isinstance(baseline, Mapping):
            report.regression.baseline = str(baseline)
    return report


@dataclass(frozen=True)
class _RunSettings:
    """The settings every (backend, batch size) run of one :func:`benchmark` call shares."""

    model: Any
    n_threads: int
    inter_op_threads: int | None
    graph_optimization_level: str
    torch_compile: bool | str
    cuda_graph: bool

    def thread_info(self, names: Sequence[str]) -> dict[str, Any]:
        return {
            "intra_op_threads": self.n_threads,
            "inter_op_threads": self.inter_op_threads,
            "torch_threads": self.n_threads if "torch" in names else None,
            "policy": "ORT intra_op_num_threads and torch.set_num_threads use the same count",
        }


def _batch_sizes(batch_sizes: Sequence[int] | None, metas: list[TensorMeta], overrides: dict[str, Shape]) -> list[int]:
    """The requested sizes once each in order, else the model's own batch size; positive integers only."""
    sizes = list(dict.fromkeys(batch_sizes)) if batch_sizes else [default_batch_size(metas, overrides)]
    bad = [b for b in sizes if not isinstance(b, int) or b < 1]
    if bad:
        raise UsageError(f"batch sizes must be positive integers, got {bad}")
    return sizes


def _read_baseline(
    baseline: str | Path | Mapping[str, Any] | None, max_regression: float | str
) -> tuple[Mapping[str, Any] | None, float]:
    """The baseline to check against (read before anything runs, so a bad file fails fast) and the limit."""
    if baseline is None:
        return None, 0.0
    from normfold.bench.regression import load_baseline, parse_fraction

    limit = parse_fraction(max_regression)
    return (baseline if isinstance(baseline, Mapping) else load_baseline(baseline)), limit


def _measure_one(
    name: str,
    b: int,
    path: Path,
    feeds: dict[str, np.ndarray],
    schedule: Schedule,
    metas: list[TensorMeta],
    run: _RunSettings,
) -> BenchResult:
    """One backend at one batch size: load, first run, warmup and the timed samples, with the options
    that were in effect."""
    options: dict[str, Any]
    if name == "torch":
        load_ms, first_ms, m = _bench_torch(run.model, metas, feeds, schedule, run.n_threads, run.torch_compile)
        copies = False
        options = {"torch_threads": run.n_threads, "torch_compile": run.torch_compile, "inference_mode": True}
    else:
        so = session_options_for(
            name,
            batch_size=b,
            threads=run.n_threads,
            inter_op_threads=run.inter_op_threads,
            graph_optimization_level=run.graph_optimization_level,
            cuda_graph=run.cuda_graph,
            shapes={k: v.shape for k, v in feeds.items()},
        )
        load_ms, first_ms, m, copies = _bench_onnx(name, path, feeds, so, schedule)
        options = {
            "graph_optimization_level": so.graph_optimization_level,
            "intra_op_threads": so.intra_op_threads,
            "inter_op_threads": so.inter_op_threads,
            "cuda_graph": so.cuda_graph,
        }
        if name != "ort-cpu":  # device backends bind inputs/outputs inside their runner
            options["io_binding_requested"] = so.io_binding
    return BenchResult(
        backend=name,
        batch_size=b,
        first_run_ms=load_ms + first_ms,
        load_ms=load_ms,
        first_infer_ms=first_ms,
        stats=summarize(m.samples_ns, b),
        copies_included=copies,
        options=options,
        warmup_iterations=m.warmup_iterations,
        warmup_ms=m.warmup_ns / 1e6,
        samples_ms=[s / 1e6 for s in m.samples_ns],
    )
