"""Run a model before and after the passes on ORT CPU with the same seeded inputs and compare.

Inputs follow the model's declared shapes and dtypes; a symbolic dimension becomes 1. Graph
optimizations are disabled so ORT's own Conv+BN fusion cannot hide (or cause) a difference.
The check is ``|after − before| ≤ atol + rtol·|before|`` elementwise, fp32 defaults atol=1e-5,
rtol=1e-4 (NORMS.md §5).
"""

from __future__ import annotations

import logging

import numpy as np

from normfold.fusers.report import OutputMetrics

logger = logging.getLogger(__name__)

DEFAULT_ATOL = 1e-5
DEFAULT_RTOL = 1e-4

_ORT_DTYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


class OrtRunError(RuntimeError):
    """ONNX Runtime could not load or run a model; the message is ORT's."""


def _session(model_bytes: bytes):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types for every load failure
        raise OrtRunError(str(e)) from e


def seeded_feeds(model_bytes: bytes, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of the model's real shapes/dtypes: standard normal floats, ints in [0, 10)."""
    sess = _session(model_bytes)
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for arg in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in arg.shape]
        dtype = _ORT_DTYPES.get(arg.type)
        if dtype is None:
            raise OrtRunError(f"input '{arg.name}' has type {arg.type}, which verification cannot generate")
        if np.issubdtype(dtype, np.floating):
            feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[arg.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feeds[arg.name] = rng.integers(0, 10, shape).astype(dtype)
    return feeds


def run_model(model_bytes: bytes, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """All graph outputs of ``model_bytes`` on ORT CPU."""
    sess = _session(model_bytes)
    names = [o.name for o in sess.get_outputs()]
    try:
        values = sess.run(names, feeds)
    except Exception as e:  # ORT raises its own exception types for every run failure
        raise OrtRunError(str(e)) from e
    return dict(zip(names, (np.asarray(v) for v in values), strict=True))


def compare_outputs(
    before: dict[str, np.ndarray], after: dict[str, np.ndarray], atol: float, rtol: float
) -> list[OutputMetrics]:
    """Per-output metrics; an output missing after the passes, or of another shape, fails."""
    metrics = []
    for name, ref in before.items():
        got = after.get(name)
        if got is None or got.shape != ref.shape:
            metrics.append(OutputMetrics(name, float("inf"), float("inf"), 1.0, False))
            continue
        if not np.issubdtype(ref.dtype, np.floating):
            equal = bool(np.array_equal(ref, got))
            metrics.append(
                OutputMetrics(name, 0.0 if equal else float("inf"), 0.0, 0.0 if equal else 1.0, equal)
            )
            continue
        r64, g64 = ref.astype(np.float64), got.astype(np.float64)
        diff = np.abs(g64 - r64)
        both_nan = np.isnan(r64) & np.isnan(g64)
        bad = (diff > atol + rtol * np.abs(r64)) & ~both_nan
        bad |= np.isnan(diff) & ~both_nan
        finite = diff[np.isfinite(diff)]
        max_abs = float(finite.max()) if finite.size else 0.0
        if np.any(np.isnan(diff) & ~both_nan):
            max_abs = float("inf")
        rel = diff / np.maximum(np.abs(r64), np.finfo(np.float64).tiny)
        rel_f = rel[np.isfinite(rel)]
        metrics.append(
            OutputMetrics(
                name,
                max_abs,
                float(rel_f.max()) if rel_f.size else 0.0,
                float(bad.mean()) if bad.size else 0.0,
                not bool(bad.any()),
            )
        )
    return metrics
