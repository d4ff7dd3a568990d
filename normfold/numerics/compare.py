"""Outputs of each backend against PyTorch eager on the same inputs.

Eager runs under ``torch.inference_mode`` on deep copies of the inputs; each ONNX backend runs the file
on the same arrays. Outputs are matched by position (torch.onnx keeps the flattened output order).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from normfold.errors import BackendUnavailableError, InputSpecError, ModelCodeError, NormfoldError
from normfold.io import load_npz
from normfold.models.guard import user_code
from normfold.numerics.metrics import TensorMetrics, compare_tensors
from normfold.numerics.tolerances import Tolerance, fail_on_for, output_tolerance, tolerance_for
from normfold.runtime.base import Backend, SessionOptions
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
    fail_on: str = "outputs"

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
            "fail_on": self.fail_on,
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
    fail_on: str = "outputs"

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
            "fail_on": self.fail_on,
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
        mapping: Mapping[str, np.ndarray] = load_npz(path)
        source = f"npz {path}"
    elif isinstance(inputs, Mapping):
        mapping, source = inputs, "given arrays"
    else:
        return tuple(torch.as_tensor(t) for t in inputs), "given tensors"
    missing = [n for n in names if n not in mapping]
    if missing:
        raise InputSpecError(f"inputs lack {missing}; the model takes {names}, got {sorted(mapping)}")
    return tuple(torch.from_numpy(np.asarray(mapping[n])) for n in names), source


def _session_options(options: SessionOptions | None, precision: str) -> SessionOptions:
    """``options`` at ``precision``; fp16/bf16 GPU loads convert through fusers' conversion (runtime imports
    no graph pass, so the caller hands it over)."""
    from normfold.fusers.precision import model_for_precision

    opts = options or SessionOptions()
    opts.precision = precision
    if opts.convert is None:
        opts.convert = model_for_precision
    return opts


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
    fail_on: str | None = None,
    output_tolerances: Mapping[str, Tolerance] | None = None,
    allow_nonfinite: bool = False,
) -> CompareReport:
    """Diff each backend's outputs on ``onnx_path`` against eager ``model`` on the same inputs.

    One eager run in all and one backend run per backend: with ``per_layer`` the instrumented run also
    yields the graph outputs, and ``output_tolerances`` (per output name) judge the same arrays.
    ``fail_on`` (default :func:`fail_on_for` the precision: ``layers`` at fp32/tf32) decides whether a
    layer out of tolerance fails the backend even when its outputs pass.

    A backend that cannot run here raises :class:`BackendUnavailableError`, or with
    ``skip_unavailable=True`` is reported as skipped with the reason (never as passed).
    """
    tol = tolerance_for(precision, atol, rtol, allow_nonfinite=allow_nonfinite)
    decide = fail_on_for(precision, fail_on)
    names = parse_backends(backends)
    module, example, input_names = _module_and_inputs(model)
    tensors, source = resolve_inputs(inputs, example, input_names)
    if inputs is None:
        source = getattr(model, "input_source", "") or source
    trace, reference = _eager_reference(module, tensors, source, per_layer)
    report = CompareReport(
        model=model_name or getattr(model, "ref", type(module).__name__),
        onnx_path=str(onnx_path),
        precision=precision,
        tolerance=tol,
        input_source=source,
        inputs={},
        fail_on=decide,
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
        opts = _session_options(options, precision)
        try:
            if per_layer:
                report.inputs = {n: list(t.shape) for n, t in zip(_onnx_input_names(onnx_path), tensors, strict=False)}
                output_names, produced, layers = _run_per_layer(module, tensors, onnx_path, backend, opts, tol, trace)
            else:
                output_names, produced, report.inputs = _run_plain(onnx_path, backend, opts, tensors)
                layers = None
        except NormfoldError:
            raise
        except Exception as e:  # a runtime failure is that backend's result, not a crash
            report.backends[name] = BackendComparison(name, "error", f"{type(e).__name__}: {e}")
            continue
        if precision != "fp32":  # a low-precision model's outputs are judged in the reference dtype
            produced = {k: _as_input(v, np.dtype(np.float32)) for k, v in produced.items()}
        comparison = _compare_outputs(name, output_names, produced, reference, tol, output_tolerances or {})
        comparison.layers = layers
        comparison.fail_on = decide
        _judge_layers(comparison, decide)
        report.backends[name] = comparison
    return report


def _eager_reference(
    module: nn.Module, tensors: tuple[torch.Tensor, ...], source: str, per_layer: bool
) -> tuple[Any, list[np.ndarray]]:
    """One eager run: hooked when layers are compared (it then serves both), plain otherwise."""
    try:
        with user_code(f"{type(module).__name__}.forward", catch_all=False):
            if per_layer:
                from normfold.numerics.layers import trace_eager

                trace = trace_eager(module, tensors)
                return trace, trace.outputs
            return None, run_eager(module, tensors)
    except ModelCodeError:
        raise
    except Exception as e:  # the user's model rejected the inputs it was given
        shapes = ", ".join("x".join(map(str, t.shape)) for t in tensors)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise InputSpecError(
            f"the eager model failed on inputs of shape {shapes} ({source}): {type(e).__name__}: {first}"
        ) from e


def _onnx_input_names(onnx_path: str | Path) -> list[str]:
    from normfold.onnx_files import read_graph

    graph = read_graph(onnx_path).graph  # external-data locations checked, no weights read
    initializers = {t.name for t in graph.initializer}
    return [v.name for v in graph.input if v.name not in initializers]


def _run_plain(
    onnx_path: str | Path, backend: Backend, opts: SessionOptions, tensors: tuple[torch.Tensor, ...]
) -> tuple[list[str], dict[str, np.ndarray], dict[str, list[int]]]:
    """One session, one run: the output names, the outputs and the fed shapes."""
    with backend.load(onnx_path, opts) as runner:
        if len(runner.inputs) != len(tensors):
            raise InputSpecError(
                f"the ONNX model takes {len(runner.inputs)} inputs {runner.input_names}, the eager model {len(tensors)}"
            )
        feeds = {
            meta.name: _as_input(t.detach().cpu().numpy(), meta.dtype)
            for meta, t in zip(runner.inputs, tensors, strict=True)
        }
        shapes = {k: list(v.shape) for k, v in feeds.items()}
        return list(runner.output_names), runner.infer(feeds), shapes


def _run_per_layer(
    module: nn.Module,
    tensors: tuple[torch.Tensor, ...],
    onnx_path: str | Path,
    backend: Backend,
    opts: SessionOptions,
    tol: Tolerance,
    trace: Any,
) -> tuple[list[str], dict[str, np.ndarray], Any]:
    """The instrumented run: every layer's value and the graph outputs from one session."""
    from normfold.numerics.layers import compare_layers

    layers = compare_layers(module, tensors, onnx_path, backend, opts, tol, trace)
    return list(layers.outputs), dict(layers.outputs), layers


def _judge_layers(comparison: BackendComparison, fail_on: str) -> None:
    """Let a diverging layer fail the backend (``fail_on="layers"``) or only explain it (``"outputs"``)."""
    layers = comparison.layers
    first = None if layers is None else layers.first_divergence
    if first is None or comparison.status != "passed":
        return
    if fail_on == "layers":
        comparison.status = "failed"
        comparison.reason = (
            f"layer {first.name} out of tolerance (max abs {first.max_abs:.3g} > {first.atol:.3g}) while "
            f"the outputs pass: the fault is masked downstream on these inputs"
        )
    else:
        # The verdict is the outputs'; a diverging layer masked downstream (ReLU, pooling) is still
        # worth knowing: other inputs may not mask it.
        comparison.reason = f"outputs within tolerance, but layer {first.module} diverges (masked downstream)"


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
    per_output: Mapping[str, Tolerance],
) -> BackendComparison:
    """Each output under its tolerance (``per_output`` overrides by name), scaled by its magnitude."""
    if len(output_names) != len(reference):
        return BackendComparison(
            backend,
            "failed",
            f"the ONNX model has {len(output_names)} outputs {output_names}, eager produced {len(reference)}",
        )
    metrics = {}
    for name, ref in zip(output_names, reference, strict=True):
        given = per_output.get(name, tol)
        scaled = output_tolerance(given, ref)
        m = compare_tensors(name, produced[name], ref, scaled)
        metrics[name] = dataclasses.replace(m, atol=given.atol, atol_eff=scaled.atol)
    ok = all(metrics.values())
    failed = [m.name for m in metrics.values() if not m]
    return BackendComparison(backend, "passed" if ok else "failed", "" if ok else f"outputs {failed} differ", metrics)
