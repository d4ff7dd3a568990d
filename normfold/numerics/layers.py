"""Per-layer numerics: every ``nn.Module`` output against the ONNX value that carries it.

Eager side
    A forward hook on every module records each call's output (tuple/list/dict outputs flattened in
    torch.onnx order) in the order the calls *finish*, under ``torch.inference_mode`` on deep copies of
    the inputs. Tensors are cloned in the hook, so an in-place op later in the model (``ReLU(inplace)``)
    cannot rewrite what was recorded. The identity of every tensor is kept during the run, which tells
    which earlier layer (or graph input) fed each call.

ONNX side
    Provenance (:func:`normfold.exporter.provenance.module_path`) names the module of every node. The
    value carrying a module's output is the first output of the **last** node (topological order) whose
    path is the module or one of its descendants; its static shape must agree with the hooked tensor
    (otherwise a later value of the same module that leaves it and has the right shape is taken, and
    failing that the layer is "shape mismatch"). A module called ``k`` times (a shared ``ReLU``) owns
    ``k`` connected groups of nodes, matched to its calls in order. In an optimized graph a Conv that
    absorbed a BatchNorm points at the BN module, so the conv module owns no node: when a node of a
    later sibling consumes the conv's input, the conv is *fused into* that sibling (which is still
    compared, so the fused computation is checked); when it belongs to an ancestor the module is
    *inlined into a fused op* (also a fusion, not a gap). A module that is the identity in this run, or
    returns its last child's tensor, is an *alias*: it shares its source's match (see
    :mod:`normfold.numerics._onnx_match`). Modules never called are ``not_called``, outside the count.
    Every other module without a value is listed with the reason.

    The matched values become extra graph outputs of a **copy** of the model and the backend runs
    **once** for all layers. Only module-boundary values are exposed, so the fusions normfold put in the
    file are untouched. A runtime may still decline one of its *own* fusions across an exposed value
    (ORT's Conv+Relu → FusedConv); that changes which kernel runs, not what the graph computes.

Tolerance along depth
    A layer passes when ``|a-b| <= atol_eff + rtol·|b|`` element-wise (plus the precision's cosine floor)
    with ``atol_eff = atol + rtol·max|ref_layer|`` (:func:`layer_tolerance`). Why the magnitude, not a
    depth factor: the rounding error of a correct graph is relative to the size of the values being
    summed, not to each element: an element that cancels to ~0 inside a layer whose values reach 50
    carries the absolute error of a 50, and the plain ``atol`` (meant for outputs of order 1) would flag
    it. Measured on the zoo at fp32 on ORT CPU (benchmarks/per_layer_cost.py prints it), a correct
    graph (exported or optimized) stays at or below 3.3e-6·max|ref| in every layer, with no trend along
    depth, while a 1 % weight fault moves the faulty layer by ~1e-2·max|ref|. ``rtol·max|ref| =
    1e-4·max|ref|`` sits between the two: ≥ 30x above the noise, ~100x below the fault. A ``sqrt(depth)`` factor was not
    needed at these depths and would only blunt detection in deep layers. Every layer's effective
    tolerance is in the report. (The graph outputs are also checked at the plain tolerance by
    :func:`normfold.numerics.compare`, as before.)

Exporter quirks
    Paths from the TorchScript exporter (``relu_1`` for a second call, child scopes relative to an
    ancestor) are mapped onto the model's real module paths, and a Conv+BN it folded, which keeps the
    *conv's* name, is credited to the BN by structure (``_folded_into_producer``), or, failing that, when
    its value matches the BN's output (see :func:`_credit_exporter_fusions`).

First divergence
    The first layer in execution order that fails. Hooks fire when a call finishes, so children come
    before their parent and the innermost module that went wrong is named, not the block around it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from normfold.errors import InputSpecError, OnnxLoadError
from normfold.io import save_onnx
from normfold.numerics._eager_trace import EagerTrace, trace_eager
from normfold.numerics._layer_rows import (
    _call_rows,
    _credit_exporter_fusions,
    _follow_credited,
    _never_called_rows,
)
from normfold.numerics._onnx_graph import _Graph
from normfold.numerics._onnx_match import _Match, _match_all
from normfold.numerics.layer_report import (
    FirstDivergence,
    LayerReport,
    LayerResult,
    LayerStatus,
    layer_tolerance,
    max_magnitude,
)
from normfold.numerics.tolerances import Tolerance
from normfold.onnx_files import PROTOBUF_LIMIT, data_file_name, has_external_data, read_graph
from normfold.runtime.base import Backend, SessionOptions

log = logging.getLogger(__name__)


__all__ = [
    "EagerTrace",
    "FirstDivergence",
    "LayerReport",
    "LayerResult",
    "LayerStatus",
    "compare_layers",
    "layer_tolerance",
    "max_magnitude",
    "trace_eager",
]


def compare_layers(
    module: nn.Module,
    inputs: Sequence[torch.Tensor],
    onnx_path: str | Path,
    backend: Backend,
    options: SessionOptions | None,
    tol: Tolerance,
    trace: EagerTrace | None = None,
) -> LayerReport:
    """Diff every module's output in eager against its ONNX value on ``backend``, run once for all.

    ``inputs`` are fed to both sides (the ONNX inputs by position). ``trace`` reuses a hooked eager run
    of the same module on the same inputs (:func:`trace_eager`); without it one is made. Returns a
    :class:`LayerReport` with every module call in execution order, its status and metrics, and the
    first divergence.
    """
    if trace is None:
        trace = trace_eager(module.eval(), inputs)
    proto = _load_proto(onnx_path)
    g = _Graph(proto.graph, trace.modules)
    if len(g.graph_inputs) != len(inputs):
        raise InputSpecError(
            f"the ONNX model takes {len(g.graph_inputs)} inputs {g.graph_inputs}, the eager model {len(inputs)}"
        )
    matches, fvalues = _match_all(g, trace)
    wanted = _wanted_values(trace, matches, fvalues)
    produced, extra = _run_instrumented(proto, g, wanted, inputs, backend, options, Path(onnx_path))
    report = LayerReport(backend=backend.name, onnx_path=str(onnx_path), tolerance=tol, extra_outputs=extra)
    report.outputs = {name: produced[name] for name in g.graph_outputs if name in produced}
    report.functional_calls, report.functional_matched = len(trace.functional), len(fvalues)
    report.layers = _call_rows(trace, matches, fvalues, produced, tol, g)
    _credit_exporter_fusions(report.layers, trace.calls, produced, tol)
    _follow_credited(report.layers)
    report.layers.extend(_never_called_rows(module, trace))
    log.debug("per-layer: %s on %s, %d extra outputs", report.counts, backend.name, extra)
    return report


def _wanted_values(
    trace: EagerTrace, matches: dict[tuple[int, int], _Match], fvalues: dict[int, str]
) -> dict[str, np.ndarray]:
    """The ONNX values to expose, each with the eager tensor it is compared with (its dtype is the
    fallback when the graph declares none)."""
    wanted: dict[str, np.ndarray] = {}
    for (order, j), m in matches.items():
        ref = trace.calls[order].outputs[j]
        if m.value is not None and ref is not None:
            wanted[m.value] = ref
    for k, value in fvalues.items():
        wanted.setdefault(value, trace.functional[k].output)
    return wanted


def _run_instrumented(
    proto: onnx.ModelProto,
    g: _Graph,
    wanted: dict[str, np.ndarray],
    inputs: Sequence[torch.Tensor],
    backend: Backend,
    options: SessionOptions | None,
    model_path: Path,
) -> tuple[dict[str, np.ndarray], int]:
    """Expose the ``wanted`` values as extra outputs of ``proto`` (a fresh copy of the file) and run it.

    Each extra output carries the graph's ``value_info`` for it, or, where the graph has none, the dtype
    of the eager tensor it is compared with. The outputs are chunked so one run never holds more than
    :func:`_output_budget` bytes of them (one run for everything unless memory is short; each further
    chunk costs one more session). Returns every produced array by value name (graph inputs included, as
    fed) and how many outputs were added.
    """
    feeds = {name: t.detach().cpu().numpy() for name, t in zip(g.graph_inputs, inputs, strict=True)}
    taken = set(g.graph_outputs) | set(feeds)
    extra: list[tuple[onnx.ValueInfoProto, int]] = []
    for name, ref in wanted.items():
        if name in taken:
            continue
        taken.add(name)
        info = g.infos.get(name)
        if info is None or not info.type.tensor_type.elem_type:
            elem = onnx.helper.np_dtype_to_tensor_dtype(ref.dtype)
            info = onnx.helper.make_tensor_value_info(name, elem, None)
        extra.append((info, ref.nbytes))
    produced: dict[str, np.ndarray] = dict(feeds)
    n_outputs = len(proto.graph.output)
    for chunk in _chunks(extra, _output_budget()):
        del proto.graph.output[n_outputs:]
        proto.graph.output.extend(chunk)
        produced.update(_run_copy(proto, model_path, feeds, backend, options))
    return produced, len(extra)


def _chunks(extra: list[tuple[onnx.ValueInfoProto, int]], budget: int) -> list[list[onnx.ValueInfoProto]]:
    """Consecutive groups of outputs of at most ``budget`` bytes each (at least one output per group)."""
    chunks: list[list[onnx.ValueInfoProto]] = [[]]
    used = 0
    for info, nbytes in extra:
        if chunks[-1] and used + nbytes > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(info)
        used += nbytes
    return chunks


def _output_budget() -> int:
    """Bytes of extra outputs one run may hold: a quarter of the memory available now (the eager
    references of the same layers are already in memory), at least 64 MiB."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            kib = next(int(line.split()[1]) for line in fh if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 1 << 30
    return max(64 << 20, kib * 1024 // 4)


def _run_copy(
    proto: onnx.ModelProto,
    model_path: Path,
    feeds: dict[str, np.ndarray],
    backend: Backend,
    options: SessionOptions | None,
) -> dict[str, np.ndarray]:
    """Run the instrumented copy once. A model with external data keeps referencing its data file: the
    copy (graph only) is written beside the original as a hidden scratch file, never the weights."""
    opts = dataclasses.replace(options) if options is not None else SessionOptions()
    external = has_external_data(proto)
    folder = str(model_path.parent) if external else _scratch_dir()
    try:
        fd, name = tempfile.mkstemp(prefix=f".{model_path.stem}.per-layer.", suffix=".onnx", dir=folder)
    except OSError as e:
        raise OnnxLoadError(
            f"per-layer needs a scratch copy of the graph beside {model_path} (its external data is "
            f"referenced, not copied), and that folder is not writable: {e}"
        ) from e
    os.close(fd)
    path = Path(name)
    try:
        if proto.ByteSize() < PROTOBUF_LIMIT:  # a private scratch file: no atomic rename needed
            path.write_bytes(proto.SerializeToString())
        else:
            save_onnx(proto, path)  # external data beside it
        with backend.load(path, opts) as runner:
            run_feeds = {
                meta.name: _cast_float(feeds[meta.name], meta.dtype) for meta in runner.inputs if meta.name in feeds
            }
            if len(run_feeds) != len(runner.inputs):
                raise InputSpecError(
                    f"the instrumented model takes inputs {runner.input_names}, the graph declares {sorted(feeds)}"
                )
            return runner.infer(run_feeds)
    finally:
        path.unlink(missing_ok=True)
        path.with_name(data_file_name(path)).unlink(missing_ok=True)


def _cast_float(arr: np.ndarray, dtype: Any) -> np.ndarray:
    """Cast between float types only (an fp16 model takes fp16 feeds); never touch integer inputs."""
    target = np.dtype(dtype) if dtype is not None else arr.dtype
    if arr.dtype != target and np.issubdtype(arr.dtype, np.floating) and np.issubdtype(target, np.floating):
        return arr.astype(target)
    return arr


def _scratch_dir() -> str | None:
    """Where the instrumented copy goes: RAM-backed ``/dev/shm`` when writable (the copy only lives for
    one session load), else the default temp dir."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def _load_proto(path: str | Path) -> onnx.ModelProto:
    """The ONNX graph as a fresh protobuf without its weights (the instrumented copy is built on it),
    external-data locations checked; errors as OnnxLoadError.

    No checker pass: the backend has just loaded the same file, and checking costs more than the run.
    """
    return read_graph(path)
