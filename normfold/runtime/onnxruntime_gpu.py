"""ONNX Runtime on the GPU: ``ort-cuda`` (CUDA EP, IO binding) and ``ort-trt`` (TensorRT EP).

The GPU-touching lines are few and thin: build provider options (pure functions, unit-tested on CPU),
create the session through the lead's :func:`create_session`, and refuse a session whose first
provider is not the one asked for (onnxruntime-gpu silently falls back to the CPU when a CUDA library
is missing; a CPU timing labelled "cuda" is worse than no timing).

Precision: ORT has no "run this fp32 model in fp16" switch on the CUDA EP, so ``fp16``/``bf16`` converts
the model with :func:`normfold.fusers.precision.convert_precision` (fp32 norm islands, fp32 I/O kept) into
the cache directory and loads that. The TensorRT EP does the same for bf16; for fp16 it uses
``trt_fp16_enable`` with ``trt_layer_norm_fp32_fallback`` on the original model, as TensorRT ≤ 10 does
for weakly typed networks.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from normfold.errors import UsageError
from normfold.runtime import onnxruntime as _ort
from normfold.runtime.base import SessionOptions
from normfold.runtime.onnxruntime import OrtRunner, create_session
from normfold.runtime.tensorrt import ShapeSpec, build_profiles, onnx_input_shapes

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path(tempfile.gettempdir()) / "normfold-cache"


def _flag(value: bool) -> str:
    return "1" if value else "0"


def cuda_provider_options(options: SessionOptions, device_id: int = 0) -> dict[str, str]:
    """CUDAExecutionProvider options: defaults, ``cuda_graph`` → ``enable_cuda_graph``, user overrides last.

    ``cudnn_conv_algo_search=EXHAUSTIVE`` picks the fastest conv algorithm once per shape (what a
    benchmark wants); ``do_copy_in_default_stream`` keeps IO-binding copies ordered with compute.
    """
    opts = {
        "device_id": str(device_id),
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "do_copy_in_default_stream": "1",
        "enable_cuda_graph": _flag(options.cuda_graph),
    }
    opts.update({k: str(v) for k, v in options.provider_options.items()})
    return opts


def _shape_list(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """``{"x": (1, 3, 8, 8)}`` → ``"x:1x3x8x8"`` (the TensorRT EP's profile-shape syntax)."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in shape)}" for name, shape in shapes.items())


def trt_provider_options(
    options: SessionOptions,
    cache_dir: Path,
    *,
    input_shapes: Mapping[str, ShapeSpec] | None = None,
    device_id: int = 0,
) -> dict[str, str]:
    """TensorrtExecutionProvider options: engine + timing caches under ``cache_dir``, fp16/bf16, CUDA graph.

    ``trt_layer_norm_fp32_fallback`` is set with fp16 so LayerNorm's Reduce/Pow layers stay fp32
    (NORMS.md §4). With dynamic inputs and ``options.batch_sizes``, one explicit profile
    (min/opt/max = smallest/largest/largest batch) replaces the EP's rebuild-on-new-shape behaviour.
    """
    fp16 = options.precision == "fp16"
    opts = {
        "device_id": str(device_id),
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": str(cache_dir / "ort-trt" / "engines"),
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": str(cache_dir / "ort-trt" / "timing"),
        "trt_fp16_enable": _flag(fp16),
        "trt_layer_norm_fp32_fallback": _flag(fp16),
        "trt_cuda_graph_enable": _flag(options.cuda_graph),
    }
    if options.precision == "bf16":
        opts["trt_bf16_enable"] = "1"
    if input_shapes and options.batch_sizes:
        (profile,) = build_profiles(input_shapes, options.batch_sizes)
        if profile:
            opts["trt_profile_min_shapes"] = _shape_list({n: s[0] for n, s in profile.items()})
            opts["trt_profile_opt_shapes"] = _shape_list({n: s[1] for n, s in profile.items()})
            opts["trt_profile_max_shapes"] = _shape_list({n: s[2] for n, s in profile.items()})
    opts.update({k: str(v) for k, v in options.provider_options.items()})
    return opts


def converted_model(onnx_path: Path, precision: str, cache_dir: Path) -> Path:
    """``onnx_path`` itself for fp32, else its fp16/bf16 conversion with fp32 norm islands (cached by hash)."""
    if precision == "fp32":
        return onnx_path
    if precision not in ("fp16", "bf16"):
        raise UsageError(f"precision {precision!r} is not one of fp32, fp16, bf16")
    from normfold.fusers.precision import convert_precision
    from normfold.onnx_files import model_digest

    digest = model_digest(onnx_path)[:16]  # model and its external data
    dst = cache_dir / "converted" / f"{onnx_path.stem}.{digest}.{precision}.onnx"
    if not dst.exists():
        convert_precision(onnx_path, dst, precision=precision, keep_io_types=True)  # type: ignore[arg-type]
    return dst


class GpuOrtRunner(OrtRunner):
    """ORT runner for the GPU EPs; with ``io_binding`` inputs and outputs live on the device as OrtValues.

    The binding is persistent: a feed with the shape and dtype of the previous call is copied into the
    same device buffer (``update_inplace``) and outputs stay bound to the buffers of the first run. That
    is what CUDA graphs require (replay reads and writes fixed addresses) and it saves an allocation per
    call otherwise. A new shape rebinds everything.

    ``infer`` copies feeds host→device, runs, and copies outputs back, so latency measured around it
    includes both copies: ``copies_included`` is True. ``first_infer_builds_engine`` tells bench to
    report the first call on its own (the TensorRT EP may build its engine there). ``device`` is
    ``"cuda"`` for the GPU backends; the same code runs with ``"cpu"`` on the CPU provider.
    """

    def __init__(
        self,
        session: Any,
        backend: str,
        *,
        device: str = "cuda",
        device_id: int = 0,
        io_binding: bool = True,
        first_infer_builds_engine: bool = False,
    ) -> None:
        super().__init__(session, backend, copies_included=True)
        self.device = device
        self.device_id = device_id
        self.io_binding = io_binding
        self.first_infer_builds_engine = first_infer_builds_engine
        self._binding: Any = None
        self._bound: dict[str, tuple[Any, tuple[int, ...], np.dtype]] = {}
        self._outputs_fixed = False
        self.rebinds = 0

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.io_binding:
            return super().infer_impl(feeds)
        import onnxruntime as ort

        if self._binding is None:
            self._binding = self.session.io_binding()
        binding = self._binding
        for name, array in feeds.items():
            array = np.ascontiguousarray(array)
            bound = self._bound.get(name)
            if bound is not None and bound[1] == array.shape and bound[2] == array.dtype:
                bound[0].update_inplace(array)
                continue
            value = ort.OrtValue.ortvalue_from_numpy(array, self.device, self.device_id)
            binding.bind_ortvalue_input(name, value)
            self._bound[name] = (value, array.shape, array.dtype)
            self._outputs_fixed = False
        if not self._outputs_fixed:
            self.rebinds += 1
            for name in self.output_names:
                binding.bind_output(name, self.device, self.device_id)
        binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        values = binding.get_outputs()
        if not self._outputs_fixed:
            for name, value in zip(self.output_names, values, strict=True):
                binding.bind_ortvalue_output(name, value)
            self._outputs_fixed = True
        # On the CPU device numpy() aliases the bound buffer, which the next run overwrites; on CUDA it
        # is already a fresh host copy.
        copy = self.device == "cpu"
        return {
            name: (v.numpy().copy() if copy else v.numpy()) for name, v in zip(self.output_names, values, strict=True)
        }

    def close(self) -> None:
        self._binding = None
        self._bound.clear()
        super().close()


class OrtCudaBackend(_ort.OrtCudaBackend):
    """CUDA EP with IO binding; ``options.provider_options`` are passed through to the EP."""

    def provider_options(self, options: SessionOptions) -> dict[str, Any]:
        return dict(cuda_provider_options(options))

    def load(self, onnx_path: str | Path, options: SessionOptions | None = None) -> OrtRunner:
        opts = options or SessionOptions()
        self.ensure_available(opts.precision)
        cache_dir = opts.cache_dir or DEFAULT_CACHE_DIR
        model = converted_model(Path(onnx_path), opts.precision, cache_dir)
        provider_opts = self.provider_options(opts)
        session = create_session(model, [(self.provider, provider_opts)], opts)
        self.check_providers(session)
        device_id = int(provider_opts.get("device_id", 0))
        return GpuOrtRunner(session, self.name, device_id=device_id, io_binding=opts.io_binding)


class OrtTensorrtBackend(_ort.OrtTensorrtBackend):
    """TensorRT EP with engine and timing caches under ``options.cache_dir``.

    The engine is built inside session creation (static shapes) or on the first ``infer`` (dynamic
    shapes without a profile), so the first call is reported separately by bench
    (``runner.first_infer_builds_engine``). CUDA is listed second only so ORT can place the nodes TensorRT
    rejects; ``check_providers`` still requires TensorRT first.
    """

    def provider_options(self, options: SessionOptions) -> dict[str, Any]:
        return dict(trt_provider_options(options, options.cache_dir or DEFAULT_CACHE_DIR))

    def load(self, onnx_path: str | Path, options: SessionOptions | None = None) -> OrtRunner:
        opts = options or SessionOptions()
        self.ensure_available(opts.precision)
        cache_dir = opts.cache_dir or DEFAULT_CACHE_DIR
        path = Path(onnx_path)
        model = converted_model(path, "bf16", cache_dir) if opts.precision == "bf16" else path
        shapes = onnx_input_shapes(model)
        provider_opts = trt_provider_options(opts, cache_dir, input_shapes=shapes)
        for key in ("trt_engine_cache_path", "trt_timing_cache_path"):
            Path(provider_opts[key]).mkdir(parents=True, exist_ok=True)
        cuda_opts = cuda_provider_options(SessionOptions(), int(provider_opts["device_id"]))
        providers: Sequence[tuple[str, dict[str, Any]]] = [
            (self.provider, provider_opts),
            ("CUDAExecutionProvider", cuda_opts),
        ]
        session = create_session(model, list(providers), opts)
        self.check_providers(session)
        return GpuOrtRunner(
            session,
            self.name,
            device_id=int(provider_opts["device_id"]),
            io_binding=opts.io_binding,
            first_infer_builds_engine=True,
        )
