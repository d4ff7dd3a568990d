"""Run a model before and after the passes on ORT CPU with the same seeded inputs and compare.

Inputs follow the model's declared shapes and dtypes; a symbolic dimension becomes 1. Graph
optimizations are disabled so ORT's own Conv+BN fusion cannot hide (or cause) a difference. The check is
the project's one element-wise rule, ``|after − before| ≤ atol + rtol·|before|`` with the fp32 defaults of
:mod:`normfold.numerics.tolerances` (atol=1e-5, rtol=1e-4): folding moves results by ~1e-6, a real fault
by far more.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from normfold.errors import OnnxLoadError
from normfold.numerics.metrics import TensorMetrics, compare_tensors
from normfold.numerics.tolerances import Tolerance
from normfold.runtime.base import SessionOptions
from normfold.runtime.onnxruntime import create_session, tensor_metas
from normfold.runtime.run import random_feeds

logger = logging.getLogger(__name__)

_NO_FUSIONS = SessionOptions(graph_optimization_level="disable")


class OrtRunError(RuntimeError):
    """ONNX Runtime could not load or run a model; the message is ORT's."""


def _session(model_bytes: bytes) -> Any:
    try:
        return create_session(model_bytes, ["CPUExecutionProvider"], _NO_FUSIONS)
    except OnnxLoadError as e:
        raise OrtRunError(str(e)) from e


def seeded_feeds(model_bytes: bytes, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of the model's real shapes/dtypes (symbolic dims → 1)."""
    return random_feeds(tensor_metas(_session(model_bytes).get_inputs()), seed=seed, dynamic_dim=1)


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
) -> list[TensorMetrics]:
    """Per-output metrics; an output missing after the passes fails.

    The same NaN/Inf before and after a rewrite is preserved behaviour (statistics that are graph
    inputs fed random values), so here matching non-finite values are allowed.
    """
    tol = Tolerance(atol=atol, rtol=rtol, allow_nonfinite=True)
    missing = np.full((0,), np.nan, dtype=np.float32)
    return [compare_tensors(name, after.get(name, missing), ref, tol) for name, ref in before.items()]
