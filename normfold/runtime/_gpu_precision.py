"""Per-tensor errors of a low-precision model, measured on the session a backend really builds.

The automatic fp32-island selection (:mod:`normfold.fusers.precision.auto`) asks an error source how
far each tensor of a candidate model is from the fp32 reference. What it measures must be what will be
deployed: the same execution provider *with the same options* (``use_tf32``, ``trt_fp16_enable``, the
layer-norm fallback...). So the session comes from the backend's own builder
(:meth:`OrtGpuBackend.session <normfold.runtime.onnxruntime_gpu.OrtGpuBackend.session>`), and ORT's
profiler reports where each node ran: a node that ORT quietly placed on the CPU provider is named in a
warning and in :attr:`TensorErrors.cpu_nodes` instead of going unnoticed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from normfold.errors import UsageError
from normfold.runtime.base import SessionOptions
from normfold.runtime.onnxruntime import OrtBackend, create_session
from normfold.runtime.onnxruntime_gpu import OrtGpuBackend
from normfold.runtime.registry import get_backend

log = logging.getLogger(__name__)


def node_providers(events: list[dict[str, Any]]) -> dict[str, str]:
    """ORT profile events → ``{node name: execution provider}`` (from each node's ``*_kernel_time``)."""
    placed: dict[str, str] = {}
    for event in events:
        name = str(event.get("name", ""))
        provider = (event.get("args") or {}).get("provider")
        if event.get("cat") == "Node" and name.endswith("_kernel_time") and provider:
            placed[name[: -len("_kernel_time")]] = str(provider)
    return placed


def _exposed(proto: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """``proto`` with every value in ``names`` that a node produces added as a graph output."""
    model = ir.from_proto(proto)
    values = {v.name: v for n in model.graph for v in n.outputs}
    present = {v.name for v in model.graph.outputs}
    for name in names:
        if name in values and name not in present:
            model.graph.outputs.append(values[name])
    return ir.to_proto(model)


class TensorErrors:
    """An ``ErrorFn``: runs a candidate model on ``backend`` and returns ``{tensor: relative error}``.

    Error per tensor: ``max|a-b| / max(max|b|, 1e-6)`` against the fp32 reference run on the same
    backend at fp32 (relative to the reference's range, so it is comparable across layers);
    non-finite values give ``inf``. ``options`` are the deployed session options (precision included).
    """

    def __init__(
        self,
        reference: onnx.ModelProto,
        feeds: Mapping[str, np.ndarray],
        *,
        backend: str = "ort-cpu",
        options: SessionOptions | None = None,
    ) -> None:
        found = get_backend(backend)
        if not isinstance(found, OrtBackend):
            raise UsageError(f"per-tensor errors need an ONNX Runtime backend, got {backend!r}")
        self.backend: OrtBackend = found
        self.options = options or SessionOptions()
        self.feeds = {k: np.asarray(v) for k, v in feeds.items()}
        self.cpu_nodes: list[str] = []
        graph = ir.from_proto(reference).graph
        self.float_names = [v.name for n in graph for v in n.outputs if v.dtype == ir.DataType.FLOAT and v.name]
        fp32 = dataclasses.replace(self.options, precision="fp32")
        self.reference = self._run(reference, self.float_names, fp32)

    def _session(self, path: Path, options: SessionOptions, profile_dir: str) -> Any:
        def profiled(so: Any) -> None:
            so.enable_profiling = True
            so.profile_file_prefix = str(Path(profile_dir) / "normfold-auto")

        if isinstance(self.backend, OrtGpuBackend):
            return self.backend.session(path, options, configure=profiled)
        provider = (self.backend.provider, self.backend.provider_options(options))
        session = create_session(path, [provider], options, configure=profiled)
        self.backend.check_providers(session)
        return session

    def _run(self, proto: onnx.ModelProto, names: list[str], options: SessionOptions) -> dict[str, np.ndarray]:
        with tempfile.TemporaryDirectory(prefix="normfold-auto-") as tmp:
            path = Path(tmp) / "model.onnx"
            onnx.save(_exposed(proto, names), str(path))
            session = self._session(path, options, tmp)
            outs = [o.name for o in session.get_outputs()]
            values = dict(zip(outs, session.run(outs, self.feeds), strict=True))
            events = json.loads(Path(session.end_profiling()).read_text())
        self._note_cpu_nodes(node_providers(events), proto)
        return values

    def _note_cpu_nodes(self, placed: Mapping[str, str], proto: onnx.ModelProto) -> None:
        if self.backend.provider == "CPUExecutionProvider":
            return
        floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
        typed = {vi.name: vi.type.tensor_type.elem_type for vi in proto.graph.value_info}
        cpu = [
            n.name
            for n in proto.graph.node
            if placed.get(n.name) == "CPUExecutionProvider" and any(typed.get(o) in floats for o in n.output)
        ]
        if cpu:
            self.cpu_nodes = sorted(set(self.cpu_nodes) | set(cpu))
            log.warning(
                "auto precision on %s: %d float node(s) ran on the CPU provider (their error is the CPU's): %s",
                self.backend.name,
                len(cpu),
                ", ".join(cpu[:10]),
            )

    def __call__(self, low: onnx.ModelProto) -> dict[str, float]:
        got = self._run(low, [n for n in self.float_names if n in self.reference], self.options)
        errors: dict[str, float] = {}
        for name, expected in self.reference.items():
            if name not in got:
                continue
            a = np.asarray(got[name], dtype=np.float64)
            b = np.asarray(expected, dtype=np.float64)
            if a.shape != b.shape:
                continue
            if not np.isfinite(a).all():
                errors[name] = float("inf")
                continue
            scale = max(float(np.abs(b).max(initial=0.0)), 1e-6)
            errors[name] = float(np.abs(a - b).max(initial=0.0)) / scale
        return errors


def ort_tensor_errors(
    reference: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    *,
    backend: str = "ort-cpu",
    options: SessionOptions | None = None,
) -> TensorErrors:
    """The error source :class:`~normfold.fusers.precision.AutoPrecision` takes (see :class:`TensorErrors`)."""
    return TensorErrors(reference, feeds, backend=backend, options=options)
