"""Native TensorRT through Polygraphy (the ``trt`` backend). Imports are lazy: TensorRT is optional.

Engine build, the only GPU-bound part, is Polygraphy's loader chain::

    NetworkFromOnnxPath(path, strongly_typed=...)  →  CreateConfig(profiles=..., tf32/fp16/bf16=...)
        →  EngineBytesFromNetwork(network, config)  →  cache file  →  EngineFromBytes  →  TrtRunner

Everything around it is pure and tested on CPU:

* profiles come from the declared batch sizes and ``dim_values``, or from the first feed
  (:mod:`normfold.runtime._gpu_common`); :func:`create_config_kwargs` maps precision to builder flags;
* :func:`needs_strongly_typed` decides the network flag: TensorRT 11 removed weak typing (and the
  FP16 builder flag); for fp16/bf16 the engine is built from the ONNX converted with fp32 norm islands
  (``SessionOptions.convert``, injected by the caller: :func:`normfold.fusers.precision.model_for_precision`),
  so the network is strongly typed there on any version;
* :func:`engine_cache_key` hashes model bytes + TensorRT version + GPU name + build settings, so an
  engine is never reused on another GPU or TensorRT release (engines are not portable across either).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from normfold.errors import BackendUnavailableError, UsageError
from normfold.io import write_bytes
from normfold.runtime._gpu_common import (
    DEFAULT_CACHE_DIR,
    Profile,
    build_profiles,
    converted_model,
    covers,
    is_dynamic,
    onnx_input_shapes,
    profile_for_feeds,
    widen_profile,
)
from normfold.runtime.base import Backend, Runner, SessionOptions, TensorMeta
from normfold.runtime.probe import INSTALL_HINT, gpu_name, route_polygraphy_logging, tensorrt_reason

log = logging.getLogger(__name__)

__all__ = [
    "INSTALL_HINT",
    "EngineBuild",
    "TensorrtBackend",
    "build_engine",
    "engine_cache_key",
    "needs_strongly_typed",
    "tensorrt_reason",
]


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
    profiles: Sequence[Profile] | None = None,
) -> EngineBuild:
    """Build (or reuse from the cache) a serialized engine for ``onnx_path``; needs a GPU and TensorRT.

    ``profiles`` default to :func:`build_profiles` over ``options.batch_sizes`` (and ``dim_values``);
    a dynamic model without batch sizes needs explicit ``profiles`` (the ``trt`` runner passes the
    shapes of its first feed), never an assumed batch of 1. ``fp32`` clears TensorRT's default TF32
    flag; ``tf32`` sets it.
    """
    reason = tensorrt_reason()
    if reason is not None:
        raise BackendUnavailableError(f"backend 'trt' cannot run here: {reason}")
    route_polygraphy_logging()
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath

    from normfold.onnx_files import model_digest

    opts = options or SessionOptions()
    cache_dir = opts.cache_dir or DEFAULT_CACHE_DIR
    model = converted_model(Path(onnx_path), opts)
    typed = needs_strongly_typed(trt.__version__, opts.precision, strongly_typed)
    if profiles is None:
        profiles = engine_profiles(onnx_input_shapes(model), opts)
    profiles = list(profiles)
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
    config_kwargs = create_config_kwargs(opts.precision, typed, profiles)
    network = NetworkFromOnnxPath(str(model), strongly_typed=typed)
    log.info("building TensorRT %s engine for %s (strongly_typed=%s)", trt.__version__, model, typed)
    data = EngineBytesFromNetwork(network, config=CreateConfig(**config_kwargs))()
    write_bytes(target, bytes(data))
    return EngineBuild(target, key, False, typed, profiles, model)


def engine_profiles(input_shapes: Mapping[str, Any], options: SessionOptions) -> list[Profile]:
    """Profiles declared by ``options``: static model → ``[{}]``; dynamic needs ``batch_sizes``."""
    if not is_dynamic(input_shapes):
        return [{}]
    if not options.batch_sizes:
        raise UsageError(
            "the model has dynamic axes and no batch sizes were given: pass SessionOptions.batch_sizes "
            "(and dim_values for non-batch axes), or let the trt runner size the engine from its first feed"
        )
    return build_profiles(input_shapes, options.batch_sizes, dim_values=options.dim_values)


def create_config_kwargs(precision: str, strongly_typed: bool, profiles: Sequence[Profile]) -> dict[str, Any]:
    """Keyword arguments for Polygraphy's ``CreateConfig`` (pure; checked on CPU against its signature).

    ``tf32`` is explicit: Polygraphy clears TensorRT's default TF32 flag unless asked, so ``fp32`` is
    fp32. fp16/bf16 builder flags only mean something on weakly typed networks (TensorRT ≤ 10).
    """
    from polygraphy.backend.trt import Profile as PolyProfile

    poly_profiles = []
    for profile in profiles:
        if not profile:
            continue
        p = PolyProfile()
        for name, (lo, opt, hi) in profile.items():
            p.add(name, min=lo, opt=opt, max=hi)
        poly_profiles.append(p)
    kwargs: dict[str, Any] = {"profiles": poly_profiles or None, "tf32": precision == "tf32"}
    if not strongly_typed:
        kwargs.update(fp16=precision == "fp16", bf16=precision == "bf16")
    return kwargs


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
    """Polygraphy's TrtRunner around an engine whose profile covers the shapes it is fed.

    With ``build`` None (a dynamic model loaded without batch sizes) the engine is built on the first
    ``infer`` for exactly the fed shapes; a later feed outside the profile rebuilds it with the profile
    widened to cover both (:func:`widen_profile`), so a batch-2 compare never meets a batch-1 engine.
    Outputs are copied out of Polygraphy's reusable host buffers, which the next call overwrites.
    """

    copies_included = True

    def __init__(
        self,
        inputs: list[TensorMeta],
        outputs: list[TensorMeta],
        onnx_path: Path,
        options: SessionOptions,
        build: EngineBuild | None = None,
    ) -> None:
        super().__init__(inputs, outputs)
        self.backend = "trt"
        self.onnx_path = onnx_path
        self.options = options
        self.build: EngineBuild | None = None
        self.runner: Any = None
        self.rebuilds = 0
        if build is not None:
            self._activate(build)

    def _activate(self, build: EngineBuild) -> None:
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        self.close()
        self.build = build
        self.runner = TrtRunner(EngineFromBytes(BytesFromPath(str(build.path))), name="normfold-trt")
        self.runner.activate()

    def _ensure_engine(self, feeds: Mapping[str, np.ndarray]) -> None:
        shapes = {n: tuple(a.shape) for n, a in feeds.items()}
        if self.build is not None and covers(self.build.profiles, shapes):
            return
        if self.build is None:
            profile = profile_for_feeds(onnx_input_shapes(self.onnx_path), shapes)
        else:
            profile = widen_profile(self.build.profiles[-1], shapes)
            self.rebuilds += 1
            log.info("feed shapes %s fall outside the engine's profile; rebuilding it", shapes)
        self._activate(build_engine(self.onnx_path, self.options, profiles=[profile]))

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._ensure_engine(feeds)
        out = self.runner.infer(feeds, copy_outputs_to_host=True)
        return {name: np.array(out[name], copy=True) for name in self.output_names}

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
    precisions = ("fp32", "tf32", "fp16", "bf16")

    def probe(self) -> str | None:
        return tensorrt_reason()

    def load(self, onnx_path: str | Path, options: SessionOptions | None = None) -> Runner:
        opts = options or SessionOptions()
        self.ensure_available(opts.precision)
        path = Path(onnx_path)
        shapes = onnx_input_shapes(path)
        declared = not is_dynamic(shapes) or bool(opts.batch_sizes)
        build = build_engine(path, opts) if declared else None
        inputs, outputs = _metas(build.onnx_path if build else path)
        return TrtEngineRunner(inputs, outputs, path, opts, build)
