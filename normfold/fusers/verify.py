"""Run a model before and after the passes on ORT CPU with the same seeded inputs and compare.

Each model state is opened once, through the project's ``ort-cpu`` backend
(:func:`normfold.runtime.get_backend`), which takes the serialized model; the seeded inputs come from
that same runner's input metadata.

Inputs follow the model's declared shapes and dtypes; a symbolic dimension becomes 1. Graph
optimizations are disabled so ORT's own Conv+BN fusion cannot hide (or cause) a difference. The check is
the project's one element-wise rule, ``|after − before| ≤ atol + rtol·|before|`` with the fp32 defaults of
:mod:`normfold.numerics.tolerances` (atol=1e-5, rtol=1e-4): folding moves results by ~1e-6, a real fault
by far more.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from normfold.errors import NormfoldError, OnnxLoadError
from normfold.fusers.base import RuleEvent
from normfold.fusers.report import VerificationReport
from normfold.numerics.metrics import TensorMetrics, compare_tensors
from normfold.numerics.tolerances import Tolerance
from normfold.onnx_files import INLINE_LIMIT, is_external, release_mapped, save_ir, tensor_bytes
from normfold.runtime.base import Runner, SessionOptions
from normfold.runtime.onnxruntime import OrtCpuBackend
from normfold.runtime.registry import get_backend
from normfold.runtime.run import random_feeds

logger = logging.getLogger(__name__)

_NO_FUSIONS = SessionOptions(graph_optimization_level="disable")


class OrtRunError(RuntimeError):
    """ONNX Runtime could not load or run a model; the message is ORT's."""


def open_model(model: bytes | Path | onnx.ModelProto) -> Runner:
    """One ORT CPU runner (graph optimizations off) for one model state: its bytes, or its file (a file for
    models with external data, which ORT reads beside it)."""
    try:
        backend = get_backend("ort-cpu")
        assert isinstance(backend, OrtCpuBackend)
        return backend.load(model, _NO_FUSIONS)
    except NormfoldError as e:
        raise OrtRunError(str(e)) from e


def seeded_feeds(runner: Runner, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of the model's real shapes/dtypes (symbolic dims → 1)."""
    return random_feeds(runner.inputs, seed=seed, dynamic_dim=1)


def run_model(runner: Runner, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """All graph outputs of the runner's model."""
    try:
        values = runner.infer(feeds)
    except Exception as e:  # ORT raises its own exception types for every run failure
        raise OrtRunError(str(e)) from e
    return {name: np.asarray(v) for name, v in values.items()}


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


class Verifier:
    """The input model's seeded outputs, computed once (one session); :meth:`check` runs one candidate
    model state against them in one more session."""

    def __init__(
        self, model: bytes | Path | onnx.ModelProto, tol: Tolerance, seed: int, scratch: Path | None = None
    ) -> None:
        self.tol, self.seed, self.scratch = tol, seed, scratch
        try:
            with open_model(model) as runner:
                self.feeds = seeded_feeds(runner, seed)
                self.before = run_model(runner, self.feeds)
        except OrtRunError as e:
            raise OnnxLoadError(
                f"ONNX Runtime cannot run the input model, so it cannot be verified: {e}; "
                "fix the model or pass verify=False (--no-verify)"
            ) from e

    def check(self, model: ir.Model) -> tuple[bool, list[TensorMetrics], str]:
        """``(passed, per-output metrics, ORT's error or "")`` for one state of the model."""
        try:
            after = self._run(model)
        except OrtRunError as e:
            return False, [], f"ORT cannot run the optimized model: {e}"
        metrics = compare_outputs(self.before, after, self.tol.atol, self.tol.rtol)
        return all(m.passed for m in metrics), metrics, ""

    def _run(self, model: ir.Model) -> dict[str, np.ndarray]:
        """Small models go to ORT as bytes; one with external (memory-mapped) tensors or beyond protobuf's
        limit is saved to a scratch file first, so ORT reads the weights from disk instead of a copy."""
        if not is_external(model) and tensor_bytes(model) < INLINE_LIMIT:
            with open_model(ir.serde.serialize_model(model).SerializeToString()) as runner:
                return run_model(runner, self.feeds)
        with tempfile.TemporaryDirectory(prefix=".normfold-verify.", dir=self.scratch) as tmp:
            path = save_ir(model, Path(tmp) / "candidate.onnx", external=True)
            release_mapped(model)
            with open_model(path) as runner:
                return run_model(runner, self.feeds)

    def report(
        self, ok: bool, metrics: list[TensorMetrics], attempt: int, disabled: list[RuleEvent], error: str
    ) -> VerificationReport:
        inputs = {k: list(v.shape) for k, v in self.feeds.items()}
        return VerificationReport(
            ok, self.tol.atol, self.tol.rtol, self.seed, inputs, metrics, attempt, disabled, error
        )
