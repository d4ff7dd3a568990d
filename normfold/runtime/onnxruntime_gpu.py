"""ONNX Runtime on the GPU: ``ort-cuda`` (CUDA EP, IO binding) and ``ort-trt`` (TensorRT EP).

The GPU-touching lines are few and thin: build provider options (pure functions, unit-tested on CPU),
create the session through :func:`create_session`, and refuse a session whose first provider is not the
one asked for (onnxruntime-gpu silently falls back to the CPU when a CUDA library is missing; a CPU
timing labelled "cuda" is worse than no timing).

Precision:

* ``fp32`` means fp32: the CUDA EP's ``use_tf32`` (on by default in ORT) is set to 0. ``tf32`` is its own
  precision (``use_tf32=1``) with its own tolerances (:mod:`normfold.numerics.tolerances`).
* The TensorRT EP has no TF32 switch (ORT 1.31) and TensorRT enables TF32 by default, so ``ort-trt`` at
  ``fp32`` computes convolutions and GEMMs in TF32 on Ampere and later: compare it with ``tf32``
  tolerances (``--precision tf32``), or start the process with ``NVIDIA_TF32_OVERRIDE=0`` (NVIDIA's
  libraries then never use TF32, process-wide; set before they load, so it is not set from here).
* ORT has no "run this fp32 model in fp16" switch on the CUDA EP, so ``fp16``/``bf16`` loads the
  conversion with fp32 norm islands that the caller supplies (``SessionOptions.convert``, see
  :func:`normfold.runtime._gpu_common.converted_model`). The TensorRT
  EP does the same for bf16; for fp16 it uses ``trt_fp16_enable`` with ``trt_layer_norm_fp32_fallback`` on
  the original model.

The TensorRT EP's options are built once (:func:`trt_provider_options`) and rendered for Triton's
onnxruntime backend by :func:`triton_trt_parameters`, so what Triton serves is what normfold verified.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from normfold.runtime._gpu_common import (
    DEFAULT_CACHE_DIR,
    ShapeSpec,
    build_profiles,
    converted_model,
    flag,
    onnx_input_shapes,
)
from normfold.runtime.base import SessionOptions
from normfold.runtime.onnxruntime import OrtBackend, OrtRunner, create_session

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CACHE_DIR",
    "GpuOrtRunner",
    "OrtCudaBackend",
    "OrtGpuBackend",
    "OrtTensorrtBackend",
    "converted_model",
    "cuda_provider_options",
    "triton_trt_parameters",
    "trt_provider_options",
]


def cuda_provider_options(options: SessionOptions, device_id: int = 0) -> dict[str, str]:
    """CUDAExecutionProvider options: defaults, ``cuda_graph`` → ``enable_cuda_graph``, user overrides last.

    ``use_tf32`` is 1 only for precision ``tf32`` (ORT's default is 1, which makes fp32 results TF32 on
    Ampere+). ``cudnn_conv_algo_search=EXHAUSTIVE`` picks the fastest conv algorithm once per shape (what
    a benchmark wants); ``do_copy_in_default_stream`` keeps IO-binding copies ordered with compute.
    """
    opts = {
        "device_id": str(device_id),
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "do_copy_in_default_stream": "1",
        "enable_cuda_graph": flag(options.cuda_graph),
        "use_tf32": flag(options.precision == "tf32"),
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
    (NORMS.md §4). With dynamic inputs and ``options.batch_sizes``, one explicit profile (min/opt/max =
    smallest/largest/largest batch; other dynamic axes sized by ``options.dim_values``) replaces the
    EP's rebuild-on-new-shape behaviour. Without batch sizes there is no explicit profile and the EP
    builds for the shapes it is fed.
    """
    fp16 = options.precision == "fp16"
    opts = {
        "device_id": str(device_id),
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": str(cache_dir / "ort-trt" / "engines"),
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": str(cache_dir / "ort-trt" / "timing"),
        "trt_fp16_enable": flag(fp16),
        "trt_layer_norm_fp32_fallback": flag(fp16),
        "trt_cuda_graph_enable": flag(options.cuda_graph),
    }
    if options.precision == "bf16":
        opts["trt_bf16_enable"] = "1"
    if input_shapes and options.batch_sizes:
        (profile,) = build_profiles(input_shapes, options.batch_sizes, dim_values=options.dim_values)
        if profile:
            opts["trt_profile_min_shapes"] = _shape_list({n: s[0] for n, s in profile.items()})
            opts["trt_profile_opt_shapes"] = _shape_list({n: s[1] for n, s in profile.items()})
            opts["trt_profile_max_shapes"] = _shape_list({n: s[2] for n, s in profile.items()})
    opts.update({k: str(v) for k, v in options.provider_options.items()})
    return opts


TRITON_TRT_KEYS: frozenset[str] = frozenset(
    {
        "trt_max_partition_iterations",
        "trt_min_subgraph_size",
        "trt_dla_enable",
        "trt_dla_core",
        "trt_force_sequential_engine_build",
        "trt_context_memory_sharing_enable",
        "trt_layer_norm_fp32_fallback",
        "trt_detailed_build_log",
        "trt_build_heuristics_enable",
        "trt_sparsity_enable",
        "trt_builder_optimization_level",
        "trt_auxiliary_streams",
        "trt_tactic_sources",
        "trt_extra_plugin_lib_paths",
        "trt_profile_min_shapes",
        "trt_profile_max_shapes",
        "trt_profile_opt_shapes",
        "trt_cuda_graph_enable",
    }
)
"""TensorRT-accelerator parameters Triton's onnxruntime backend passes through unchanged (its
``src/onnxruntime.cc``; any other key is refused at model load). Precision goes as ``precision_mode``;
cache paths are host paths of this machine and are left to the server."""


def triton_trt_parameters(
    options: SessionOptions, *, input_shapes: Mapping[str, ShapeSpec] | None = None
) -> list[tuple[str, str]]:
    """Triton ``gpu_execution_accelerator { name: "tensorrt" }`` parameters for what ``ort-trt`` runs.

    Rendered from :func:`trt_provider_options` itself, so fp16 carries ``trt_layer_norm_fp32_fallback``
    exactly as the verified ``ort-trt`` run did. Keys Triton does not accept (device id, cache paths)
    are dropped; ``trt_fp16_enable``/``trt_bf16_enable`` become ``precision_mode``.
    """
    opts = trt_provider_options(options, DEFAULT_CACHE_DIR, input_shapes=input_shapes)
    mode = "FP16" if opts.get("trt_fp16_enable") == "1" else "BF16" if opts.get("trt_bf16_enable") == "1" else "FP32"
    params = [("precision_mode", mode)]
    params += [(k, v) for k, v in opts.items() if k in TRITON_TRT_KEYS and not (v == "0" and k.endswith("_enable"))]
    return params


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


class OrtGpuBackend(OrtBackend):
    """An ORT GPU EP: the session it builds (:meth:`session`) is the one every caller measures on."""

    runner_builds_engine: ClassVar[bool] = False

    def session_providers(self, model: Path, options: SessionOptions) -> list[tuple[str, dict[str, Any]]]:
        """Providers and their options for ``model`` (already at ``options.precision``)."""
        raise NotImplementedError

    def prepared_model(self, onnx_path: Path, options: SessionOptions) -> Path:
        """The file this backend really loads for ``options.precision`` (a cached conversion or the input)."""
        return converted_model(onnx_path, options)

    def session(self, model: Path, options: SessionOptions, configure: Any = None) -> Any:
        """The ORT session for ``model`` exactly as :meth:`load` builds it; refuses a provider fallback.

        ``configure`` (an ``onnxruntime.SessionOptions`` callback) only adds observation, e.g. profiling.
        """
        return self._create(model, self.session_providers(model, options), options, configure)

    def _create(
        self, model: Path, providers: list[tuple[str, dict[str, Any]]], options: SessionOptions, configure: Any
    ) -> Any:
        session = create_session(model, list(providers), options, configure=configure)
        self.check_providers(session)
        return session

    def load(self, onnx_path: str | Path, options: SessionOptions | None = None) -> OrtRunner:
        opts = options or SessionOptions()
        self.ensure_available(opts.precision)
        if self.name == "ort-trt" and opts.precision == "fp32" and os.environ.get("NVIDIA_TF32_OVERRIDE") != "0":
            log.warning(
                "ort-trt runs fp32 models with TensorRT's default TF32 (the EP has no switch): compare it at "
                "tf32 tolerances, or start the process with NVIDIA_TF32_OVERRIDE=0 for strict fp32"
            )
        model = self.prepared_model(Path(onnx_path), opts)
        providers = self.session_providers(model, opts)
        session = self._create(model, providers, opts, None)
        return GpuOrtRunner(
            session,
            self.name,
            device_id=int(providers[0][1].get("device_id", 0)),
            io_binding=opts.io_binding,
            first_infer_builds_engine=self.runner_builds_engine,
        )


class OrtCudaBackend(OrtGpuBackend):
    """CUDA EP with IO binding; ``options.provider_options`` are passed through to the EP."""

    name = "ort-cuda"
    description = "ONNX Runtime, CUDA execution provider"
    provider = "CUDAExecutionProvider"
    precisions = ("fp32", "tf32", "fp16", "bf16")

    def provider_options(self, options: SessionOptions) -> dict[str, Any]:
        return dict(cuda_provider_options(options))

    def session_providers(self, model: Path, options: SessionOptions) -> list[tuple[str, dict[str, Any]]]:
        return [(self.provider, self.provider_options(options))]


class OrtTensorrtBackend(OrtGpuBackend):
    """TensorRT EP with engine and timing caches under ``options.cache_dir``.

    The engine is built inside session creation (static shapes) or on the first ``infer`` (dynamic
    shapes without a profile), so the first call is reported separately by bench
    (``runner.first_infer_builds_engine``). CUDA is listed second only so ORT can place the nodes TensorRT
    rejects; ``check_providers`` still requires TensorRT first. ``fp32`` is TF32 here (module docstring).
    """

    name = "ort-trt"
    description = "ONNX Runtime, TensorRT execution provider"
    provider = "TensorrtExecutionProvider"
    precisions = ("fp32", "tf32", "fp16", "bf16")
    runner_builds_engine = True

    def provider_options(self, options: SessionOptions) -> dict[str, Any]:
        return dict(trt_provider_options(options, options.cache_dir or DEFAULT_CACHE_DIR))

    def prepared_model(self, onnx_path: Path, options: SessionOptions) -> Path:
        """bf16 is converted in ONNX; fp16 runs the original with ``trt_fp16_enable`` (module docstring)."""
        if options.precision == "bf16":
            return converted_model(onnx_path, options)
        return onnx_path

    def session_providers(self, model: Path, options: SessionOptions) -> list[tuple[str, dict[str, Any]]]:
        cache_dir = options.cache_dir or DEFAULT_CACHE_DIR
        trt_opts = trt_provider_options(options, cache_dir, input_shapes=onnx_input_shapes(model))
        for key in ("trt_engine_cache_path", "trt_timing_cache_path"):
            Path(trt_opts[key]).mkdir(parents=True, exist_ok=True)
        cuda_opts = cuda_provider_options(SessionOptions(precision=options.precision), int(trt_opts["device_id"]))
        return [(self.provider, dict(trt_opts)), ("CUDAExecutionProvider", dict(cuda_opts))]
