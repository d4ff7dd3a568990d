"""GPU backends: pure option/profile/cache-key logic and the probes on CPU; real runs under the gpu marker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from normfold.errors import BackendUnavailableError, InputSpecError, UsageError
from normfold.fusers.precision import model_for_precision
from normfold.runtime import get_backend
from normfold.runtime._gpu_common import (
    build_profiles,
    converted_model,
    covers,
    dim_values_from_shapes,
    onnx_input_shapes,
    profile_for_feeds,
    widen_profile,
)
from normfold.runtime.base import SessionOptions
from normfold.runtime.onnxruntime_gpu import (
    TRITON_TRT_KEYS,
    GpuOrtRunner,
    OrtCudaBackend,
    cuda_provider_options,
    triton_trt_parameters,
    trt_provider_options,
)
from normfold.runtime.probe import INSTALL_HINT, gpu_reason, nvinfer_hint, route_polygraphy_logging
from normfold.runtime.tensorrt import (
    build_engine,
    create_config_kwargs,
    engine_cache_key,
    engine_profiles,
    needs_strongly_typed,
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
    assert opts["use_tf32"] == "0"  # ORT defaults to TF32; fp32 must mean fp32
    assert cuda_provider_options(SessionOptions(precision="tf32"))["use_tf32"] == "1"
    assert cuda_provider_options(SessionOptions(precision="fp16"))["use_tf32"] == "0"
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


def test_trt_ep_profile_sizes_a_dynamic_sequence_axis_from_the_user_shapes(tmp_path: Path) -> None:
    """bench --input x:2x7x8 on a [N, T, 8] model: T comes from the user's shape, N from --batch."""
    shapes = onnx_input_shapes(_ln_model(tmp_path / "q.onnx", seq="T"))
    with pytest.raises(InputSpecError, match="axis 1 is dynamic"):
        trt_provider_options(SessionOptions(batch_sizes=(2,)), tmp_path, input_shapes=shapes)
    opts = SessionOptions(batch_sizes=(2,), dim_values=dim_values_from_shapes({"x": (2, 7, 8)}))
    built = trt_provider_options(opts, tmp_path, input_shapes=shapes)
    assert built["trt_profile_min_shapes"] == built["trt_profile_max_shapes"] == "x:2x7x8"


def test_bench_session_options_carry_the_feed_shapes() -> None:
    from normfold.bench.harness import session_options_for

    so = session_options_for("ort-trt", batch_size=4, threads=1, shapes={"x": (4, 7, 8)})
    assert so.batch_sizes == (4,) and so.dim_values == {"x:0": 4, "x:1": 7, "x:2": 8}


def test_triton_trt_parameters_are_the_verified_ort_trt_options() -> None:
    fp16 = dict(triton_trt_parameters(SessionOptions(precision="fp16")))
    assert fp16["precision_mode"] == "FP16" and fp16["trt_layer_norm_fp32_fallback"] == "1"
    assert set(fp16) - {"precision_mode"} <= TRITON_TRT_KEYS  # Triton refuses any other key
    fp32 = dict(triton_trt_parameters(SessionOptions()))
    assert fp32["precision_mode"] == "FP32" and fp32.get("trt_layer_norm_fp32_fallback", "0") == "0"
    assert dict(triton_trt_parameters(SessionOptions(precision="bf16")))["precision_mode"] == "BF16"


def test_triton_fp16_config_renders_the_same_parameters(tmp_path: Path) -> None:
    from normfold.serve.triton import render_config

    text = render_config(
        name="m",
        platform="onnxruntime",
        max_batch=8,
        inputs=[],
        outputs=[],
        dynamic_batching=False,
        instances=1,
        kind="gpu",
        trt_accelerator=True,
        fp16=True,
    )
    for key, value in triton_trt_parameters(SessionOptions(precision="fp16")):
        assert f'parameters {{ key: "{key}" value: "{value}" }}' in text


def test_profiles_follow_the_feeds(tmp_path: Path) -> None:
    shapes = onnx_input_shapes(_ln_model(tmp_path / "m.onnx"))
    first = profile_for_feeds(shapes, {"x": (2, 5, 8)})
    assert first == {"x": ((2, 5, 8), (2, 5, 8), (2, 5, 8))}
    assert covers([first], {"x": (2, 5, 8)}) and not covers([first], {"x": (3, 5, 8)})
    wider = widen_profile(first, {"x": (6, 5, 8)})
    assert wider == {"x": ((2, 5, 8), (6, 5, 8), (6, 5, 8))} and covers([wider], {"x": (4, 5, 8)})
    assert profile_for_feeds(onnx_input_shapes(_ln_model(tmp_path / "s.onnx", batch=2)), {}) == {}
    with pytest.raises(InputSpecError, match="rank"):
        profile_for_feeds(shapes, {"x": (2, 5)})
    with pytest.raises(UsageError, match="no batch sizes"):  # never an assumed batch of 1
        engine_profiles(shapes, SessionOptions())
    assert engine_profiles(shapes, SessionOptions(batch_sizes=(1, 2))) == [{"x": ((1, 5, 8), (2, 5, 8), (2, 5, 8))}]


def test_create_config_kwargs_fit_polygraphy_and_mean_what_they_say() -> None:
    import inspect

    from polygraphy.backend.trt import CreateConfig

    params = {
        p for cls in CreateConfig.__mro__ if "__init__" in vars(cls) for p in inspect.signature(cls.__init__).parameters
    }
    fp32 = create_config_kwargs("fp32", False, [{"x": ((1, 5, 8), (2, 5, 8), (2, 5, 8))}])
    assert set(fp32) <= params
    assert fp32["tf32"] is False and fp32["fp16"] is False and len(fp32["profiles"]) == 1
    assert create_config_kwargs("tf32", True, [{}]) == {"profiles": None, "tf32": True}
    assert create_config_kwargs("fp16", False, [{}])["fp16"] is True


def test_polygraphy_logs_go_to_python_logging_not_stdout(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    from polygraphy.logger import G_LOGGER

    route_polygraphy_logging()
    with caplog.at_level("INFO", logger="Polygraphy"):
        G_LOGGER.warning("normfold-probe warning")
        G_LOGGER.info("TF32 is disabled by default.")
    assert capsys.readouterr().out == ""
    assert "normfold-probe warning" in caplog.text


def test_nvinfer_hint_names_the_missing_tensorrt() -> None:
    msg = "libnvinfer.so.10: cannot open shared object file: No such file or directory"
    hint = nvinfer_hint(msg, "11.1.0.106")
    assert "needs TensorRT 10.x" in hint and "installed tensorrt is 11.1.0.106" in hint
    assert "tensorrt-cu13==10.*" in hint
    assert "not installed" in nvinfer_hint(msg, None)
    assert nvinfer_hint("libcudnn.so.9: cannot open shared object file", "10.13") == ""


def test_tensor_errors_measure_on_the_backend_session_and_see_placement(tmp_path: Path) -> None:
    """The error source builds its session through the backend; ORT's profiler says where nodes ran."""
    from normfold.runtime._gpu_precision import TensorErrors, node_providers

    model = onnx.shape_inference.infer_shapes(onnx.load(str(_ln_model(tmp_path / "m.onnx"))))
    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    errors = TensorErrors(model, {"x": x})
    assert errors(model) == {"n": 0.0, "y": 0.0} and errors.cpu_nodes == []
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "p")
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    session.run(None, {"x": x})
    import json

    placed = node_providers(json.loads(Path(session.end_profiling()).read_text()))
    assert placed and set(placed.values()) == {"CPUExecutionProvider"}
    with pytest.raises(UsageError, match="ONNX Runtime backend"):
        TensorErrors(model, {"x": x}, backend="torch")


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
    assert "tf32" in get_backend("ort-cuda").precisions and "tf32" not in get_backend("ort-cpu").precisions
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
    converted = model_for_precision(model, "fp16", tmp_path / "cache")
    assert converted.parent == tmp_path / "cache" / "converted" and converted.name.endswith(".fp16.onnx")
    stamp = converted.stat().st_mtime_ns
    assert model_for_precision(model, "fp16", tmp_path / "cache") == converted
    assert converted.stat().st_mtime_ns == stamp
    assert model_for_precision(model, "fp32", tmp_path / "cache") == model
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
    opts = SessionOptions(
        precision=precision, cache_dir=tmp_path / "cache", batch_sizes=(1, 4), convert=model_for_precision
    )
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


def _available(name: str) -> None:
    status = get_backend(name).status()
    if not status.available:
        pytest.skip(f"{name}: {status.reason}")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["ort-trt", "trt"])
def test_dynamic_batch_model_fed_batch_2_then_3_without_declared_batches(tmp_path: Path, name: str) -> None:
    """compare/run/per-layer declare no batch sizes: the engine must fit what it is fed (issue 14, item 3)."""
    _available(name)
    model = _ln_model(tmp_path / "m.onnx")
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    with get_backend(name).load(model, SessionOptions(cache_dir=tmp_path / "cache")) as runner:
        kept = []
        for batch in (2, 2, 3):
            x = rng.standard_normal((batch, 5, 8)).astype(np.float32)
            kept.append((runner.infer({"x": x})["y"], session.run(None, {"x": x})[0]))
    for got, want in kept:  # outputs are copies: later runs do not overwrite earlier results
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["ort-cuda", "trt"])
def test_tf32_is_an_explicit_precision(tmp_path: Path, name: str) -> None:
    _available(name)
    model = _ln_model(tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((4, 5, 8)).astype(np.float32)
    ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    opts = SessionOptions(precision="tf32", cache_dir=tmp_path / "cache", batch_sizes=(4,))
    with get_backend(name).load(model, opts) as runner:
        np.testing.assert_allclose(runner.infer({"x": x})["y"], ref, atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["ort-trt", "trt"])
def test_custom_norm_plugins_honour_eps(tmp_path: Path, name: str) -> None:
    """GN/IN with eps = 0.5 through the TensorRT plugins match the native ops (GN once lost its eps)."""
    from normfold.exporter.custom_norms import to_custom_norms

    _available(name)
    rng = np.random.default_rng(0)
    c = 8
    params = [numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), n) for n in ("s", "b")]
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        [
            helper.make_node("GroupNormalization", ["x", "s", "b"], ["g"], num_groups=2, epsilon=0.5),
            helper.make_node("InstanceNormalization", ["g", "s", "b"], ["y"], epsilon=0.5),
        ],
        "g",
        [value("x", TensorProto.FLOAT, [1, c, 4, 4])],
        [value("y", TensorProto.FLOAT, [1, c, 4, 4])],
        params,
    )
    native = tmp_path / "n.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), str(native))
    custom = to_custom_norms(native, tmp_path / "c.onnx").path
    assert custom is not None
    x = {"x": (0.5 * rng.standard_normal((1, c, 4, 4))).astype(np.float32)}
    ref = ort.InferenceSession(str(native), providers=["CPUExecutionProvider"]).run(None, x)[0]
    with get_backend(name).load(custom, SessionOptions(cache_dir=tmp_path / "cache")) as runner:
        np.testing.assert_allclose(runner.infer(x)["y"], ref, atol=1e-3, rtol=1e-3)


SMOKE = Path(__file__).resolve().parents[2] / "scripts" / "gpu_smoke.sh"


def test_gpu_smoke_script_parses_and_fails_loudly_without_a_gpu() -> None:
    import subprocess

    assert subprocess.run(["bash", "-n", str(SMOKE)], capture_output=True, text=True).returncode == 0
    if not NO_GPU:
        pytest.skip("a GPU is visible: the no-GPU refusal cannot be observed (make test-gpu runs the script)")
    run = subprocess.run(["bash", str(SMOKE)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 3
    assert run.stdout.startswith("FAIL gpu: no NVIDIA GPU visible") and "PASS" not in run.stdout


def test_gpu_runtime_modules_share_a_common_module_and_import_no_fuser() -> None:
    """Layering: the two GPU modules never import each other; runtime imports no fuser at module level."""
    import ast

    import normfold.runtime as runtime_pkg

    root = Path(runtime_pkg.__file__).parent
    top_level: dict[str, set[str]] = {}
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
        names |= {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
        top_level[path.stem] = names
    assert "normfold.runtime.tensorrt" not in top_level["onnxruntime_gpu"]
    assert "normfold.runtime.onnxruntime_gpu" not in top_level["tensorrt"]
    assert {"normfold.runtime._gpu_common"} <= top_level["tensorrt"] & top_level["onnxruntime_gpu"]
    assert not [m for names in top_level.values() for m in names if m.startswith("normfold.fusers")]
    from normfold.runtime import onnxruntime as ort_module

    assert not hasattr(ort_module, "OrtCudaBackend")  # one class per name: the GPU backends live in one module


def test_a_low_precision_reaches_each_gpu_backend_as_the_file_it_loads(tmp_path: Path) -> None:
    """ort-cuda loads the fp16/bf16 conversion; ort-trt converts only bf16 (fp16 is the EP's switch);
    fp32/tf32 load the model itself. The conversion is the caller's (SessionOptions.convert)."""
    from normfold.runtime.onnxruntime_gpu import OrtTensorrtBackend

    model = _ln_model(tmp_path / "m.onnx")
    cache = tmp_path / "cache"

    def opts(precision: str) -> SessionOptions:
        return SessionOptions(precision=precision, cache_dir=cache, convert=model_for_precision)

    fp16 = OrtCudaBackend().prepared_model(model, opts("fp16"))
    assert fp16 != model and fp16.parent == cache / "converted" and fp16.name.endswith(".fp16.onnx")
    graph = onnx.load(str(fp16)).graph
    assert graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # fp32 I/O kept
    casts = [a.i for n in graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"]
    assert TensorProto.FLOAT16 in casts  # the graph computes in fp16 between fp32 boundaries
    assert OrtCudaBackend().prepared_model(model, opts("tf32")) == model
    trt = OrtTensorrtBackend()
    assert trt.prepared_model(model, opts("fp16")) == model
    assert trt.prepared_model(model, opts("bf16")).name.endswith(".bf16.onnx")


def test_a_low_precision_without_a_converter_is_refused_not_run_at_fp32(tmp_path: Path) -> None:
    model = _ln_model(tmp_path / "m.onnx")
    with pytest.raises(UsageError, match=r"fp16 on a GPU backend runs a converted model.*model_for_precision"):
        converted_model(model, SessionOptions(precision="fp16"))
    assert converted_model(model, SessionOptions(precision="fp32")) == model
    with pytest.raises(UsageError, match="precision 'int8'"):
        converted_model(model, SessionOptions(precision="int8", convert=model_for_precision))


def test_the_layers_above_runtime_hand_the_gpu_backends_the_converter() -> None:
    from normfold.bench.harness import session_options_for

    opts = session_options_for("ort-cuda", batch_size=1, threads=1, precision="fp16")
    assert opts.precision == "fp16" and opts.convert is model_for_precision
