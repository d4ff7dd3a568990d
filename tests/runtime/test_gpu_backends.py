"""GPU backends: pure option/profile/cache-key logic and the probes on CPU; real runs under the gpu marker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from normfold.errors import BackendUnavailableError, InputSpecError, UsageError
from normfold.runtime import get_backend
from normfold.runtime.base import SessionOptions
from normfold.runtime.onnxruntime_gpu import (
    GpuOrtRunner,
    OrtCudaBackend,
    converted_model,
    cuda_provider_options,
    trt_provider_options,
)
from normfold.runtime.probe import gpu_reason
from normfold.runtime.tensorrt import (
    INSTALL_HINT,
    build_engine,
    build_profiles,
    engine_cache_key,
    needs_strongly_typed,
    onnx_input_shapes,
)

NO_GPU = gpu_reason() is not None


def _ln_model(path: Path, batch: str | int = "N", seq: str | int = 5) -> Path:
    """x:[batch, seq, 8] → LayerNormalization → Relu."""
    scale = numpy_helper.from_array(np.linspace(0.5, 1.5, 8).astype(np.float32), "s")
    graph = helper.make_graph(
        [helper.make_node("LayerNormalization", ["x", "s"], ["n"]), helper.make_node("Relu", ["n"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, seq, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, seq, 8])],
        [scale],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.save(model, str(path))
    return path


def test_cuda_provider_options() -> None:
    opts = cuda_provider_options(SessionOptions())
    assert opts["device_id"] == "0" and opts["enable_cuda_graph"] == "0"
    assert opts["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    graphed = cuda_provider_options(SessionOptions(cuda_graph=True, provider_options={"gpu_mem_limit": 1 << 30}))
    assert graphed["enable_cuda_graph"] == "1" and graphed["gpu_mem_limit"] == str(1 << 30)
    user = cuda_provider_options(SessionOptions(provider_options={"cudnn_conv_algo_search": "HEURISTIC"}))
    assert user["cudnn_conv_algo_search"] == "HEURISTIC"


def test_trt_provider_options_caches_precision_and_profiles(tmp_path: Path) -> None:
    fp32 = trt_provider_options(SessionOptions(), tmp_path)
    assert fp32["trt_engine_cache_enable"] == "1" and fp32["trt_timing_cache_enable"] == "1"
    assert Path(fp32["trt_engine_cache_path"]).is_relative_to(tmp_path)
    assert Path(fp32["trt_timing_cache_path"]).is_relative_to(tmp_path)
    assert fp32["trt_engine_cache_path"] != fp32["trt_timing_cache_path"]
    assert (fp32["trt_fp16_enable"], fp32["trt_layer_norm_fp32_fallback"]) == ("0", "0")
    assert "trt_profile_min_shapes" not in fp32

    shapes = onnx_input_shapes(_ln_model(tmp_path / "m.onnx"))
    fp16 = trt_provider_options(
        SessionOptions(precision="fp16", cuda_graph=True, batch_sizes=(8, 1, 4)), tmp_path, input_shapes=shapes
    )
    assert (fp16["trt_fp16_enable"], fp16["trt_layer_norm_fp32_fallback"]) == ("1", "1")
    assert fp16["trt_cuda_graph_enable"] == "1"
    assert fp16["trt_profile_min_shapes"] == "x:1x5x8"
    assert fp16["trt_profile_opt_shapes"] == fp16["trt_profile_max_shapes"] == "x:8x5x8"
    bf16 = trt_provider_options(SessionOptions(precision="bf16"), tmp_path)
    assert bf16["trt_bf16_enable"] == "1" and bf16["trt_fp16_enable"] == "0"


def test_build_profiles_from_dynamic_axes(tmp_path: Path) -> None:
    shapes = onnx_input_shapes(_ln_model(tmp_path / "m.onnx"))
    assert shapes == {"x": ("N", 5, 8)}
    assert build_profiles(shapes, [4, 1, 16]) == [{"x": ((1, 5, 8), (16, 5, 8), (16, 5, 8))}]
    per = build_profiles(shapes, [1, 4], per_batch=True)
    assert per == [{"x": ((1, 5, 8),) * 3}, {"x": ((4, 5, 8),) * 3}]
    static = onnx_input_shapes(_ln_model(tmp_path / "s.onnx", batch=2))
    assert build_profiles(static, [1, 8]) == [{}]
    seq = onnx_input_shapes(_ln_model(tmp_path / "q.onnx", seq="T"))
    with pytest.raises(InputSpecError, match=r"input 'x' axis 1 is dynamic \(T\)"):
        build_profiles(seq, [1])
    assert build_profiles(seq, [1, 2], dim_values={"T": 7}) == [{"x": ((1, 7, 8), (2, 7, 8), (2, 7, 8))}]
    with pytest.raises(UsageError, match="positive"):
        build_profiles(shapes, [0])


def test_strong_typing_rules() -> None:
    assert needs_strongly_typed("10.13.0.35", "fp32") is False
    assert needs_strongly_typed("10.13.0.35", "fp16") is True
    assert needs_strongly_typed("11.0.0", "fp32") is True
    assert needs_strongly_typed("10.8.0", "fp32", requested=True) is True
    with pytest.raises(UsageError, match="no weakly typed networks"):
        needs_strongly_typed("11.1.0", "fp32", requested=False)
    with pytest.raises(UsageError, match="cannot parse"):
        needs_strongly_typed("ten", "fp32")


def test_engine_cache_key_separates_what_makes_engines_incompatible() -> None:
    profile = [{"x": ((1, 5, 8), (8, 5, 8), (8, 5, 8))}]
    base = {"precision": "fp16", "strongly_typed": True, "profiles": profile}
    key = engine_cache_key("abc", "10.13.0", "NVIDIA H100 80GB HBM3", **base)
    assert key == engine_cache_key("abc", "10.13.0", "NVIDIA H100 80GB HBM3", **base)
    others = {
        engine_cache_key("abd", "10.13.0", "NVIDIA H100 80GB HBM3", **base),
        engine_cache_key("abc", "10.14.0", "NVIDIA H100 80GB HBM3", **base),
        engine_cache_key("abc", "10.13.0", "NVIDIA A100-SXM4-40GB", **base),
        engine_cache_key("abc", "10.13.0", "NVIDIA H100 80GB HBM3", **{**base, "precision": "fp32"}),
        engine_cache_key("abc", "10.13.0", "NVIDIA H100 80GB HBM3", **{**base, "profiles": [{}]}),
    }
    assert key not in others and len(others) == 5


@pytest.mark.skipif(not NO_GPU, reason="a GPU is visible; the CPU-only reasons cannot be observed")
def test_probes_give_exact_reasons_without_a_gpu(tmp_path: Path) -> None:
    cuda = get_backend("ort-cuda").status()
    assert not cuda.available
    assert cuda.reason.startswith("no NVIDIA GPU visible")
    assert "onnxruntime lists CUDAExecutionProvider but creating a session with it failed: " in cuda.reason
    trt_ep = get_backend("ort-trt").status()
    assert "onnxruntime lists TensorrtExecutionProvider but creating a session with it failed: " in trt_ep.reason
    trt = get_backend("trt").status()
    assert not trt.available and f"tensorrt not installed ({INSTALL_HINT})" in trt.reason
    model = _ln_model(tmp_path / "m.onnx")
    for name in ("ort-cuda", "ort-trt", "trt"):
        with pytest.raises(BackendUnavailableError, match=f"backend '{name}' cannot run here: no NVIDIA GPU"):
            get_backend(name).load(model)
    with pytest.raises(BackendUnavailableError, match="cannot run here"):
        build_engine(model)


def test_a_session_that_fell_back_to_cpu_is_an_error(tmp_path: Path) -> None:
    session = ort.InferenceSession(str(_ln_model(tmp_path / "m.onnx")), providers=["CPUExecutionProvider"])
    with pytest.raises(BackendUnavailableError, match=r"fell back to \['CPUExecutionProvider'\]"):
        OrtCudaBackend().check_providers(session)


def test_runner_without_io_binding_and_fp16_conversion_cache(tmp_path: Path) -> None:
    model = _ln_model(tmp_path / "m.onnx")
    converted = converted_model(model, "fp16", tmp_path / "cache")
    assert converted.parent == tmp_path / "cache" / "converted" and converted.name.endswith(".fp16.onnx")
    stamp = converted.stat().st_mtime_ns
    assert converted_model(model, "fp16", tmp_path / "cache") == converted
    assert converted.stat().st_mtime_ns == stamp
    assert converted_model(model, "fp32", tmp_path / "cache") == model
    session = ort.InferenceSession(str(converted), providers=["CPUExecutionProvider"])
    runner = GpuOrtRunner(session, "ort-cuda", io_binding=False)
    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    with runner:
        (y,) = runner.infer({"x": x}).values()
    ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert runner.copies_included and y.dtype == np.float32
    np.testing.assert_allclose(y, ref, atol=1e-2, rtol=1e-2)


def test_persistent_io_binding_on_the_cpu_device(tmp_path: Path) -> None:
    """The binding logic the CUDA runner uses, on ORT's CPU device: same buffers reused, new shape rebinds."""
    model = _ln_model(tmp_path / "m.onnx")
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    runner = GpuOrtRunner(session, "ort-cpu", device="cpu")
    rng = np.random.default_rng(0)
    results = []
    with runner:
        for batch in (2, 2, 2, 3, 3):
            x = rng.standard_normal((batch, 5, 8)).astype(np.float32)
            results.append((runner.infer({"x": x})["y"], session.run(None, {"x": x})[0]))
        assert runner.rebinds == 2  # once per distinct input shape
    for got, want in results:  # earlier outputs are not overwritten by later runs
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["ort-cuda", "ort-trt", "trt"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_gpu_backend_matches_cpu(tmp_path: Path, name: str, precision: str) -> None:
    backend = get_backend(name)
    if not backend.status().available:
        pytest.skip(backend.status().reason)
    model = _ln_model(tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((4, 5, 8)).astype(np.float32)
    ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    opts = SessionOptions(precision=precision, cache_dir=tmp_path / "cache", batch_sizes=(1, 4))
    with backend.load(model, opts) as runner:
        (y,) = runner.infer({"x": x}).values()
    tol = 1e-5 if precision == "fp32" else 1e-2
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, atol=tol, rtol=tol)


@pytest.mark.gpu
def test_trt_engine_cache_is_reused(tmp_path: Path) -> None:
    if get_backend("trt").status().available is False:
        pytest.skip(get_backend("trt").status().reason)
    model = _ln_model(tmp_path / "m.onnx")
    opts = SessionOptions(cache_dir=tmp_path / "cache", batch_sizes=(1, 4))
    first = build_engine(model, opts)
    second = build_engine(model, opts)
    assert not first.cached and second.cached and first.path == second.path
