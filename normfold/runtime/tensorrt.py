"""Native TensorRT through Polygraphy (the ``trt`` backend). Imports are lazy: TensorRT is optional.

Engine build, the only GPU-bound part, is Polygraphy's loader chain::

    NetworkFromOnnxPath(path, strongly_typed=...)  →  CreateConfig(profiles=..., fp16/bf16=...)
        →  EngineBytesFromNetwork(network, config)  →  cache file  →  EngineFromBytes  →  TrtRunner

Everything around it is pure and tested on CPU:

* :func:`onnx_input_shapes` reads the graph inputs' dims (ints, or the symbolic name / None of a dynamic
  axis);
* :func:`build_profiles` turns them into optimization profiles whose dynamic batch dim spans the
  requested batch sizes (min = smallest, opt = max = largest; or one exact profile per size);
* :func:`needs_strongly_typed` decides the network flag: TensorRT 11 removed weak typing (and the
  FP16 builder flag); for fp16/bf16 normfold converts the ONNX itself with fp32 norm islands
  (:mod:`normfold.fusers.precision`), so the network is strongly typed there on any version;
* :func:`engine_cache_key` hashes model bytes + TensorRT version + GPU name + build settings, so an
  engine is never reused on another GPU or TensorRT release (engines are not portable across either).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from normfold.errors import BackendUnavailableError, InputSpecError, UsageError
from normfold.io import write_bytes
from normfold.runtime.base import Backend, Runner, SessionOptions, TensorMeta
from normfold.runtime.probe import gpu_name, gpu_reason

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'normfold[tensorrt]'"

Dim = int | str | None
ShapeSpec = tuple[Dim, ...]
Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
"""input name → (min, opt, max) shapes."""


def tensorrt_reason() -> str | None:
    """None when tensorrt and polygraphy import and a GPU is visible; else why not."""
    missing = [m for m in ("tensorrt", "polygraphy") if importlib.util.find_spec(m) is None]
    no_gpu = gpu_reason()
    if missing:
        why = f"{' and '.join(missing)} not installed ({INSTALL_HINT})"
        return f"{no_gpu}; {why}" if no_gpu else why
    if no_gpu:
        return no_gpu
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # a broken install raises ImportError or OSError from the loader
        return f"tensorrt is installed but failed to import: {type(e).__name__}: {e}"
    return None


def onnx_input_shapes(onnx_path: str | Path) -> dict[str, ShapeSpec]:
    """Graph inputs (initializers excluded) → dims: int, symbolic name, or None when unnamed and unknown."""
    from normfold.onnx_files import read_graph

    model = read_graph(onnx_path)  # external-data locations checked before the parser follows them
    initializers = {t.name for t in model.graph.initializer}
    shapes: dict[str, ShapeSpec] = {}
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        dims: list[Dim] = []
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or None)
        shapes[vi.name] = tuple(dims)
    return shapes


def build_profiles(
    input_shapes: Mapping[str, ShapeSpec],
    batch_sizes: Sequence[int],
    *,
    dim_values: Mapping[str, int] | None = None,
    per_batch: bool = False,
) -> list[Profile]:
    """Optimization profiles for the dynamic axes of ``input_shapes``.

    The first dim of an input, when dynamic, is the batch: min = smallest requested batch, opt = max =
    largest (throughput is tuned for the largest batch), or with ``per_batch`` one exact profile per
    size. Any other dynamic dim must be fixed through ``dim_values`` (keyed by the symbolic name, or by
    ``"input:axis"``), else the error names it. Static inputs appear in no profile; a model without
    dynamic axes gets ``[{}]`` (one implicit profile).
    """
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise UsageError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    values = dict(dim_values or {})
    sizes = sorted(set(batch_sizes))
    fixed: dict[str, list[int | None]] = {}
    for name, shape in input_shapes.items():
        if all(isinstance(d, int) for d in shape):
            continue
        resolved: list[int | None] = []
        for axis, d in enumerate(shape):
            if isinstance(d, int):
                resolved.append(d)
            elif axis == 0:
                resolved.append(None)  # the batch axis
            elif d is not None and d in values:
                resolved.append(int(values[d]))
            elif f"{name}:{axis}" in values:
                resolved.append(int(values[f"{name}:{axis}"]))
            else:
                raise InputSpecError(
                    f"input {name!r} axis {axis} is dynamic ({d or 'unnamed'}) and not the batch axis; "
                    f"give its size (dim_values={{{(d or f'{name}:{axis}')!r}: N}}, CLI: --input)"
                )
        fixed[name] = resolved

    def shape_for(resolved: list[int | None], batch: int) -> tuple[int, ...]:
        return tuple(batch if d is None else d for d in resolved)

    if not fixed:
        return [{}]
    groups = [[b] for b in sizes] if per_batch else [sizes]
    profiles: list[Profile] = []
    for group in groups:
        lo, hi = group[0], group[-1]
        profiles.append({n: (shape_for(r, lo), shape_for(r, hi), shape_for(r, hi)) for n, r in fixed.items()})
    return profiles


def trt_major(version: str) -> int:
    """``"10.13.0.35"`` → 10; an unparsable version raises UsageError naming it."""
    try:
        return int(version.split(".", 1)[0])
    except ValueError as e:
        raise UsageError(f"cannot parse TensorRT version {version!r}") from e


def needs_strongly_typed(trt_version: str, precision: str, requested: bool | None = None) -> bool:
    """Strongly typed when TensorRT ≥ 11 (weak typing is gone), when asked, or for fp16/bf16.

    fp16/bf16 models are converted in ONNX with fp32 norm islands before the build, and only a strongly
    typed network honours those Casts (a weakly typed one may re-choose precisions per layer).
    Asking for a weakly typed network on TensorRT ≥ 11 is an error, not a silent upgrade.
    """
    major = trt_major(trt_version)
    if requested is False and major >= 11:
        raise UsageError(f"TensorRT {trt_version} has no weakly typed networks (removed in 11); drop the override")
    if requested is not None:
        return requested
    return major >= 11 or precision in ("fp16", "bf16")


def engine_cache_key(
    model_sha256: str,
    trt_version: str,
    gpu: str,
    *,
    precision: str,
    strongly_typed: bool,
    profiles: Sequence[Profile],
) -> str:
    """Stable hex key: the same model on the same GPU + TensorRT + settings reuses its engine."""
    payload = {
        "model": model_sha256,
        "tensorrt": trt_version,
        "gpu": gpu,
        "precision": precision,
        "strongly_typed": strongly_typed,
        "profiles": [{n: [list(s) for s in p[n]] for n in sorted(p)} for p in profiles],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class EngineBuild:
    """Where an engine is (or will be) cached and how it was built."""

    path: Path
    key: str
    cached: bool
    strongly_typed: bool
    profiles: list[Profile]
    onnx_path: Path

    def to_dict(self) -> dict[str, object]:
        return {
            "path": str(self.path),
            "key": self.key,
            "cached": self.cached,
            "strongly_typed": self.strongly_typed,
            "profiles": [{n: [list(s) for s in p[n]] for n in p} for p in self.profiles],
            "onnx_path": str(self.onnx_path),
        }


def build_engine(
    onnx_path: str | Path,
    options: SessionOptions | None = None,
    *,
    engine_path: str | Path | None = None,
    strongly_typed: bool | None = None,
) -> EngineBuild:
    """Build (or reuse from the cache) a serialized engine for ``onnx_path``; needs a GPU and TensorRT."""
    reason = tensorrt_reason()
    if reason is not None:
        raise BackendUnavailableError(f"backend 'trt' cannot run here: {reason}")
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath
    from polygraphy.backend.trt import Profile as PolyProfile

    from normfold.onnx_files import model_digest
    from normfold.runtime.onnxruntime_gpu import DEFAULT_CACHE_DIR, converted_model

    opts = options or SessionOptions()
    cache_dir = opts.cache_dir or DEFAULT_CACHE_DIR
    model = converted_model(Path(onnx_path), opts.precision, cache_dir)
    typed = needs_strongly_typed(trt.__version__, opts.precision, strongly_typed)
    profiles = build_profiles(onnx_input_shapes(model), opts.batch_sizes or (1,))
    key = engine_cache_key(
        model_digest(model),  # the weights in NAME.data are part of the engine
        trt.__version__,
        gpu_name() or "unknown-gpu",
        precision=opts.precision,
        strongly_typed=typed,
        profiles=profiles,
    )
    target = Path(engine_path) if engine_path else cache_dir / "trt" / f"{key}.engine"
    if target.exists() and target.stat().st_size > 0:
        log.info("reusing TensorRT engine %s", target)
        return EngineBuild(target, key, True, typed, profiles, model)
    poly_profiles = []
    for profile in profiles:
        if not profile:
            continue
        p = PolyProfile()
        for name, (lo, opt, hi) in profile.items():
            p.add(name, min=lo, opt=opt, max=hi)
        poly_profiles.append(p)
    config_kwargs: dict[str, Any] = {"profiles": poly_profiles or None}
    if not typed:  # precision flags only mean something on weakly typed networks (TensorRT ≤ 10)
        config_kwargs.update(fp16=opts.precision == "fp16", bf16=opts.precision == "bf16")
    network = NetworkFromOnnxPath(str(model), strongly_typed=typed)
    log.info("building TensorRT %s engine for %s (strongly_typed=%s)", trt.__version__, model, typed)
    data = EngineBytesFromNetwork(network, config=CreateConfig(**config_kwargs))()
    write_bytes(target, bytes(data))
    return EngineBuild(target, key, False, typed, profiles, model)


_TRT_NP: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}


class TrtEngineRunner(Runner):
    """Polygraphy's TrtRunner around a deserialized engine; outputs are copied to host numpy arrays."""

    copies_included = True

    def __init__(self, runner: Any, inputs: list[TensorMeta], outputs: list[TensorMeta], build: EngineBuild) -> None:
        super().__init__(inputs, outputs)
        self.backend = "trt"
        self.runner = runner
        self.build = build
        self.runner.activate()

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.runner.infer(feeds, copy_outputs_to_host=True)
        return {name: np.asarray(out[name]) for name in self.output_names}

    def close(self) -> None:
        if self.runner is not None and self.runner.is_active:
            self.runner.deactivate()
        self.runner = None


def _metas(onnx_path: Path) -> tuple[list[TensorMeta], list[TensorMeta]]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}

    def meta(vi: Any) -> TensorMeta:
        elem = vi.type.tensor_type.elem_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))
        dims = tuple(
            int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None)
            for d in vi.type.tensor_type.shape.dim
        )
        return TensorMeta(vi.name, dims, dtype)

    inputs = [meta(vi) for vi in model.graph.input if vi.name not in initializers]
    return inputs, [meta(vi) for vi in model.graph.output]


class TensorrtBackend(Backend):
    name = "trt"
    description = "native TensorRT engine built through Polygraphy"
    precisions = ("fp32", "fp16", "bf16")

    def probe(self) -> str | None:
        return tensorrt_reason()

    def load(self, onnx_path: str | Path, options: SessionOptions | None = None) -> Runner:
        opts = options or SessionOptions()
        self.ensure_available(opts.precision)
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        build = build_engine(onnx_path, opts)
        inputs, outputs = _metas(build.onnx_path)
        runner = TrtRunner(EngineFromBytes(BytesFromPath(str(build.path))), name="normfold-trt")
        return TrtEngineRunner(runner, inputs, outputs, build)
