"""benchmark() on real ORT sessions and a real torch module (tiny models, tiny iteration counts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from normfold.bench import benchmark
from normfold.bench.harness import (
    CUDA_GRAPH_BACKENDS,
    batch_shapes,
    check_model_inputs,
    default_batch_size,
    onnx_input_metas,
    session_options_for,
)
from normfold.errors import (
    BackendUnavailableError,
    InputSpecError,
    OnnxLoadError,
    UnknownBackendError,
    UsageError,
)
from normfold.runtime.probe import ort_provider_reason

FAST = {"warmup": 2, "iters": 5}
REQUIRED = {
    "backend",
    "batch_size",
    "first_run_ms",
    "min_ms",
    "p50_ms",
    "p90_ms",
    "p95_ms",
    "p99_ms",
    "max_ms",
    "mean_ms",
    "std_ms",
    "throughput",
    "iterations",
    "copies_included",
    "options",
}


def test_dynamic_model_runs_at_every_requested_batch(dynamic_onnx: Path) -> None:
    report = benchmark(dynamic_onnx, batch_sizes=[1, 3, 3, 8], **FAST)
    assert [(r.backend, r.batch_size) for r in report.results] == [("ort-cpu", 1), ("ort-cpu", 3), ("ort-cpu", 8)]
    for r in report.results:
        assert r.stats.iterations == 5 and len(r.samples_ms) == 5 and r.warmup_iterations == 2
        assert r.first_run_ms == pytest.approx(r.load_ms + r.first_infer_ms)
        assert r.load_ms > 0 and r.first_infer_ms > 0
        assert r.copies_included is False
        assert r.stats.throughput == pytest.approx(r.batch_size * 1000 / r.stats.mean_ms)
        assert r.options["graph_optimization_level"] == "all"


def test_report_json_has_the_documented_fields(dynamic_onnx: Path) -> None:
    report = benchmark(dynamic_onnx, **FAST, threads=1, graph_optimization_level="basic")
    data = json.loads(json.dumps(report.to_dict()))
    assert data["schema"] == "normfold.bench/1" and data["passed"] is True and data["regression"] is None
    (row,) = data["results"]
    assert set(row) >= REQUIRED
    assert "samples_ms" not in row
    assert row["options"]["intra_op_threads"] == 1 and row["options"]["graph_optimization_level"] == "basic"
    env = data["environment"]
    assert {"cpu_model", "cpu_count", "versions", "providers", "threads"} <= set(env)
    assert {"torch", "onnxruntime", "normfold"} <= set(env["versions"])
    assert env["threads"]["intra_op_threads"] == 1
    assert "CPUExecutionProvider" in env["providers"]
    assert len(report.to_dict(include_samples=True)["results"][0]["samples_ms"]) == 5


def test_default_batch_is_the_models_own(static_onnx: Path, dynamic_onnx: Path) -> None:
    assert [r.batch_size for r in benchmark(static_onnx, **FAST).results] == [2]
    assert [r.batch_size for r in benchmark(dynamic_onnx, **FAST).results] == [1]


def test_static_model_at_another_batch_size_is_a_clear_error(static_onnx: Path) -> None:
    with pytest.raises(InputSpecError, match=r"static batch dimension of 2.*batch size 8.*--dynamic-batch"):
        benchmark(static_onnx, batch_sizes=[2, 8], **FAST)


def test_other_dynamic_dims_need_an_input_shape(seq_onnx: Path) -> None:
    with pytest.raises(InputSpecError, match=r"dynamic dimension 1.*--input x:1x8x16"):
        benchmark(seq_onnx, **FAST)
    report = benchmark(seq_onnx, batch_sizes=[4], inputs={"x": (1, 5, 16)}, **FAST)
    assert report.results[0].batch_size == 4
    assert batch_shapes(onnx_input_metas(seq_onnx), 4, {"x": (1, 5, 16)}) == {"x": (4, 5, 16)}


@pytest.mark.parametrize(
    ("inputs", "match"),
    [({"x": (1, 5, 17)}, r"received incompatible shape: 1x5x17"), ({"y": (1, 5, 16)}, r"not model inputs")],
)
def test_input_shapes_that_do_not_fit_are_rejected(seq_onnx: Path, inputs: dict, match: str) -> None:
    with pytest.raises(InputSpecError, match=match):
        benchmark(seq_onnx, inputs=inputs, **FAST)


def test_bad_requests_fail_before_running(tmp_path: Path, dynamic_onnx: Path) -> None:
    with pytest.raises(UnknownBackendError, match="unknown backend 'ort-gpu'"):
        benchmark(dynamic_onnx, backends="ort-gpu")
    not_onnx = tmp_path / "notes.onnx"
    not_onnx.write_text("hello")
    with pytest.raises(OnnxLoadError, match="not a readable ONNX model"):
        benchmark(not_onnx)
    with pytest.raises(UsageError, match="--model"):
        benchmark(dynamic_onnx, backends=["torch"])
    with pytest.raises(UsageError, match="--torch-compile"):
        benchmark(dynamic_onnx, torch_compile=True)
    with pytest.raises(UsageError, match="--cuda-graph applies to ort-cuda and ort-trt"):
        benchmark(dynamic_onnx, cuda_graph=True)
    with pytest.raises(UsageError, match="graph optimization level 'max'"):
        benchmark(dynamic_onnx, graph_optimization_level="max")
    with pytest.raises(UsageError, match="--threads"):
        benchmark(dynamic_onnx, threads=0)
    with pytest.raises(UsageError, match="baseline file not found"):
        benchmark(dynamic_onnx, baseline=tmp_path / "none.json")


@pytest.mark.skipif(ort_provider_reason("CUDAExecutionProvider") is None, reason="CUDA EP works here")
def test_unavailable_backend_raises_with_the_reason(dynamic_onnx: Path) -> None:
    with pytest.raises(BackendUnavailableError, match="backend 'ort-cuda' cannot run here"):
        benchmark(dynamic_onnx, backends=["ort-cpu", "ort-cuda"], cuda_graph=True)


def test_cuda_graph_is_requested_only_from_cuda_backends() -> None:
    for name in ("ort-cpu", *CUDA_GRAPH_BACKENDS):
        so = session_options_for(name, batch_size=4, threads=3, inter_op_threads=1, cuda_graph=True)
        assert so.cuda_graph is (name in CUDA_GRAPH_BACKENDS)
        assert so.io_binding is True and so.batch_sizes == (4,)
        assert (so.intra_op_threads, so.inter_op_threads) == (3, 1)
    assert session_options_for("ort-cuda", batch_size=1, threads=1).cuda_graph is False


def test_torch_baseline_uses_ort_thread_count_and_restores_it(dynamic_onnx: Path, tiny_module: torch.nn.Module) -> None:
    before = torch.get_num_threads()
    report = benchmark(dynamic_onnx, backends="torch,ort-cpu", batch_sizes=[1, 4], model=tiny_module, threads=1, **FAST)
    assert torch.get_num_threads() == before
    assert [(r.backend, r.batch_size) for r in report.results] == [
        ("torch", 1),
        ("torch", 4),
        ("ort-cpu", 1),
        ("ort-cpu", 4),
    ]
    torch_row, ort_row = report.result("torch", 4), report.result("ort-cpu", 4)
    assert torch_row.options["torch_threads"] == ort_row.options["intra_op_threads"] == 1
    assert torch_row.options["inference_mode"] is True and torch_row.options["torch_compile"] is False
    assert torch_row.load_ms == 0.0 and torch_row.first_infer_ms > 0
    assert report.environment["threads"]["torch_threads"] == 1
    assert report.model == "Tiny"


def test_torch_model_with_other_inputs_is_rejected(dynamic_onnx: Path) -> None:
    from normfold.runtime.base import TensorMeta

    metas = onnx_input_metas(dynamic_onnx)
    with pytest.raises(InputSpecError, match=r"--model input x has shape 1x3x8x8 but the ONNX input is x:\?x16"):
        check_model_inputs(["x"], [(1, 3, 8, 8)], metas)
    with pytest.raises(InputSpecError, match="takes 2 input"):
        check_model_inputs(["a", "b"], [(1, 16), (1, 16)], metas)
    check_model_inputs(["x"], [(7, 16)], metas)  # batch dimension may differ
    assert default_batch_size([TensorMeta("x", ("n", 16), metas[0].dtype)], {"x": (6, 16)}) == 6


def test_module_that_rejects_the_inputs_is_an_input_error(dynamic_onnx: Path) -> None:
    wrong = torch.nn.Linear(3, 3)
    with pytest.raises(InputSpecError, match=r"torch model failed on the ONNX model's inputs \(x:1x16\)"):
        benchmark(dynamic_onnx, backends="torch", model=wrong, **FAST)


def test_baseline_regression_is_attached(dynamic_onnx: Path) -> None:
    first = benchmark(dynamic_onnx, **FAST)
    same = benchmark(dynamic_onnx, baseline=first.to_dict(), max_regression="1000%", **FAST)
    assert same.regression is not None and same.passed
    assert [e.status for e in same.regression.entries] == ["unchanged"]
    faster = first.to_dict()
    for r in faster["results"]:
        r["p50_ms"] /= 100.0
        r["mad_ms"] = 0.0
    slower = benchmark(dynamic_onnx, baseline=faster, max_regression="10%", **FAST)
    assert slower.regression is not None and slower.regression.regressed and not slower.passed
    assert slower.to_dict()["regression"]["entries"][0]["status"] == "regressed"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", CUDA_GRAPH_BACKENDS)
def test_cuda_backends_with_cuda_graph(dynamic_onnx: Path, backend: str) -> None:
    from normfold.runtime.registry import get_backend

    status = get_backend(backend).status()  # a GPU without, say, TensorRT skips with the reason
    if not status.available:
        pytest.skip(f"{backend}: {status.reason}")
    report = benchmark(dynamic_onnx, backends=[backend], batch_sizes=[1, 4], cuda_graph=True, **FAST)
    assert [r.options["cuda_graph"] for r in report.results] == [True, True]
    assert all(r.stats.iterations == 5 for r in report.results)


@pytest.mark.slow
def test_torch_compile_lands_in_first_run(dynamic_onnx: Path, tiny_module: torch.nn.Module) -> None:
    # "eager" keeps dynamo's capture (the code path under test) but skips inductor's C++ build
    report = benchmark(dynamic_onnx, backends="torch", model=tiny_module, torch_compile="eager", threads=1, **FAST)
    (row,) = report.results
    assert row.options["torch_compile"] == "eager" and row.load_ms > 0
    assert row.first_run_ms > row.stats.p50_ms


def test_timed_call_is_session_run_for_the_plain_ort_runner(dynamic_onnx: Path) -> None:
    import functools

    import numpy as np

    from normfold.bench.harness import timed_call
    from normfold.runtime.registry import get_backend

    class Wrapped(get_backend("ort-cpu").load(dynamic_onnx).__class__):
        def infer_impl(self, feeds: dict) -> dict:
            return {"y": np.zeros(1)}

    feeds = {"x": np.ones((2, 16), np.float32)}
    with get_backend("ort-cpu").load(dynamic_onnx) as runner:
        call = timed_call(runner, feeds)
        assert isinstance(call, functools.partial) and call.func == runner.session.run
        (y,) = call()
        assert y.shape == (2, 16)
        np.testing.assert_array_equal(y, runner.infer(feeds)["y"])
        wrapped = Wrapped(runner.session, "ort-cpu")
        assert timed_call(wrapped, feeds)()["y"].shape == (1,)  # an overriding runner keeps its infer_impl

    # The GPU backends' IO-binding runner (here on ORT's CPU device) is timed through its infer_impl
    from normfold.runtime.onnxruntime_gpu import GpuOrtRunner

    with get_backend("ort-cpu").load(dynamic_onnx) as plain:
        bound = GpuOrtRunner(plain.session, "ort-cuda", device="cpu")
        call = timed_call(bound, feeds)
        assert call.func == bound.infer_impl and bound.copies_included
        np.testing.assert_allclose(call()["y"], plain.infer(feeds)["y"])
        call()
        assert bound.rebinds == 1  # the persistent binding is reused across timed calls
