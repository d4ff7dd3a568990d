"""Outputs of each backend against PyTorch eager on the same inputs.

Eager runs under ``torch.inference_mode`` on deep copies of the inputs; each ONNX backend runs the file
on the same arrays. Outputs are matched by position (torch.onnx keeps the flattened output order).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from normfold.errors import BackendUnavailableError, InputSpecError, ModelCodeError, NormfoldError
from normfold.models.guard import user_code
from normfold.numerics.metrics import TensorMetrics, compare_tensors
from normfold.numerics.tolerances import Tolerance, tolerance_for
from normfold.runtime.base import SessionOptions
from normfold.runtime.eager import run_eager
from normfold.runtime.registry import get_backend, parse_backends

if TYPE_CHECKING:
    from normfold.models.loader import LoadedModel

log = logging.getLogger(__name__)

BackendState = Literal["passed", "failed", "skipped", "error"]
InputsLike = Sequence[torch.Tensor] | Mapping[str, np.ndarray] | str | Path | None


@dataclass
class BackendComparison:
    """One backend's outputs against eager; ``status`` is skipped (with reason) when it cannot run here."""

    backend: str
    status: BackendState
    reason: str = ""
    outputs: dict[str, TensorMetrics] = field(default_factory=dict)
    layers: Any = None  # a normfold.numerics.layers.LayerReport when per_layer=True

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def max_abs(self) -> float:
        return max((m.max_abs for m in self.outputs.values()), default=float("nan"))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "backend": self.backend,
            "status": self.status,
            "passed": self.passed,
            "reason": self.reason,
            "outputs": {k: v.to_dict() for k, v in self.outputs.items()},
        }
        if self.layers is not None:
            d["layers"] = self.layers.to_dict()
        return d


@dataclass
class CompareReport:
    """Every requested backend against eager. ``passed`` needs at least one backend run, none failed."""

    model: str
    onnx_path: str
    precision: str
    tolerance: Tolerance
    input_source: str
    inputs: dict[str, list[int]]
    backends: dict[str, BackendComparison] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        ran = [b for b in self.backends.values() if b.status != "skipped"]
        return bool(ran) and all(b.passed for b in ran)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "model": self.model,
            "onnx_path": self.onnx_path,
            "precision": self.precision,
            "tolerance": self.tolerance.to_dict(),
            "input_source": self.input_source,
            "inputs": self.inputs,
            "backends": {k: v.to_dict() for k, v in self.backends.items()},
        }


def _module_and_inputs(model: nn.Module | LoadedModel) -> tuple[nn.Module, tuple[torch.Tensor, ...], list[str]]:
    if isinstance(model, nn.Module):
        return model.eval(), (), []
    return model.module.eval(), tuple(model.example_inputs), list(model.input_names)


def resolve_inputs(
    inputs: InputsLike, example_inputs: tuple[torch.Tensor, ...], names: list[str]
) -> tuple[tuple[torch.Tensor, ...], str]:
    """The tensors to feed both sides, and a description of where they came from."""
    if inputs is None:
        if not example_inputs:
            raise InputSpecError("no inputs: pass example inputs, an npz file or --input NAME:SHAPE")
        return example_inputs, "seeded random (seed 0)"
    if isinstance(inputs, (str, Path)):
        path = Path(inputs)
        if not path.exists():
            raise InputSpecError(f"inputs file not found: {path}")
        try:
            data = np.load(path)
        except Exception as e:
            raise InputSpecError(f"{path} is not a readable .npz file ({type(e).__name__}: {e})") from e
        mapping: Mapping[str, np.ndarray] = {k: data[k] for k in data.files}
        source = f"npz {path}"
    elif isinstance(inputs, Mapping):
        mapping, source = inputs, "given arrays"
    else:
        return tuple(torch.as_tensor(t) for t in inputs), "given tensors"
    missing = [n for n in names if n not in mapping]
    if missing:
        raise InputSpecError(f"inputs lack {missing}; the model takes {names}, got {sorted(mapping)}")
    return tuple(torch.from_numpy(np.asarray(mapping[n])) for n in names), source


def compare(
    model: nn.Module | LoadedModel,
    onnx_path: str | Path,
    inputs: InputsLike = None,
    *,
    backends: Sequence[str] | str = ("ort-cpu",),
    precision: str = "fp32",
    atol: float | None = None,
    rtol: float | None = None,
    per_layer: bool = False,
    skip_unavailable: bool = False,
    options: SessionOptions | None = None,
    model_name: str = "",
) -> CompareReport:
    """Diff each backend's outputs on ``onnx_path`` against eager ``model`` on the same inputs.

    A backend that cannot run here raises :class:`BackendUnavailableError`, or with
    ``skip_unavailable=True`` is reported as skipped with the reason (never as passed).
    """
    tol = tolerance_for(precision, atol, rtol)
    names = parse_backends(backends)
    module, example, input_names = _module_and_inputs(model)
    tensors, source = resolve_inputs(inputs, example, input_names)
    if inputs is None:
        source = getattr(model, "input_source", "") or source
    trace = None
    try:
        with user_code(f"{type(module).__name__}.forward", catch_all=False):
            if per_layer:  # one hooked eager run serves as the output reference and for every backend's layers
                from normfold.numerics.layers import trace_eager

                trace = trace_eager(module, tensors)
                reference = trace.outputs
            else:
                reference = run_eager(module, tensors)
    except ModelCodeError:
        raise
    except Exception as e:  # the user's model rejected the inputs it was given
        shapes = ", ".join("x".join(map(str, t.shape)) for t in tensors)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise InputSpecError(
            f"the eager model failed on inputs of shape {shapes} ({source}): {type(e).__name__}: {first}"
        ) from e
    report = CompareReport(
        model=model_name or getattr(model, "ref", type(module).__name__),
        onnx_path=str(onnx_path),
        precision=precision,
        tolerance=tol,
        input_source=source,
        inputs={},
    )
    for name in names:
        backend = get_backend(name)
        if name == "torch":
            continue  # the reference itself
        try:
            backend.ensure_available(precision)
        except BackendUnavailableError as e:
            if not skip_unavailable:
                raise
            report.backends[name] = BackendComparison(name, "skipped", str(e))
            continue
        opts = options or SessionOptions()
        opts.precision = precision
        with backend.load(onnx_path, opts) as runner:
            if len(runner.inputs) != len(tensors):
                raise InputSpecError(
                    f"the ONNX model takes {len(runner.inputs)} inputs {runner.input_names}, "
                    f"the eager model {len(tensors)}"
                )
            feeds = {
                meta.name: _as_input(t.detach().cpu().numpy(), meta.dtype)
                for meta, t in zip(runner.inputs, tensors, strict=True)
            }
            report.inputs = {k: list(v.shape) for k, v in feeds.items()}
            try:
                produced = runner.infer(feeds)
            except NormfoldError:
                raise
            except Exception as e:  # a runtime failure is that backend's result, not a crash
                report.backends[name] = BackendComparison(name, "error", f"{type(e).__name__}: {e}")
                continue
            if precision != "fp32":  # a low-precision model's outputs are judged in the reference dtype
                produced = {k: _as_input(v, np.dtype(np.float32)) for k, v in produced.items()}
            comparison = _compare_outputs(name, runner.output_names, produced, reference, tol)
        if per_layer:  # after the session above is closed: one copy of the weights in ORT at a time
            from normfold.numerics.layers import compare_layers

            comparison.layers = compare_layers(module, tensors, onnx_path, backend, opts, tol, trace)
            first = comparison.layers.first_divergence
            if comparison.passed and first is not None:
                # The verdict is the outputs'; a diverging layer masked downstream (ReLU, pooling) is
                # still worth knowing: other inputs may not mask it.
                comparison.reason = f"outputs within tolerance, but layer {first.module} diverges (masked downstream)"
        report.backends[name] = comparison
    return report


def _as_input(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast between float types only (an fp16 model takes fp16 feeds); never touch integer inputs."""
    if arr.dtype != dtype and np.issubdtype(arr.dtype, np.floating) and np.issubdtype(dtype, np.floating):
        return arr.astype(dtype)
    return arr


def _compare_outputs(
    backend: str,
    output_names: list[str],
    produced: dict[str, np.ndarray],
    reference: list[np.ndarray],
    tol: Tolerance,
) -> BackendComparison:
    if len(output_names) != len(reference):
        return BackendComparison(
            backend,
            "failed",
            f"the ONNX model has {len(output_names)} outputs {output_names}, eager produced {len(reference)}",
        )
    metrics = {
        name: compare_tensors(name, produced[name], ref, tol) for name, ref in zip(output_names, reference, strict=True)
    }
    ok = all(metrics.values())
    failed = [m.name for m in metrics.values() if not m]
    return BackendComparison(backend, "passed" if ok else "failed", "" if ok else f"outputs {failed} differ", metrics)
