"""Per-layer report types: one row per module call, the first divergence, the report of one run.

See :mod:`normfold.numerics.layers` for how rows are matched and what the tolerance rule is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from normfold.numerics.metrics import TensorMetrics
from normfold.numerics.tolerances import Tolerance

#: ``not_called``: a submodule the eager forward never called (no hook fired). It is no layer of this run,
#: so it is listed apart and left out of the layer count (and of the unmatched share).
LayerStatus = Literal["pass", "fail", "fused", "unmatched", "not_called"]

#: Reasons an executed layer has no compared value (JSON ``reason_kind``).
REASON_NO_COUNTERPART = "no ONNX counterpart"
REASON_INLINED = "inlined into a fused op"
REASON_NON_TENSOR = "non-tensor output"
REASON_SHAPE = "shape mismatch"
REASON_NOT_CALLED = "not called in forward"
REASON_CALLS = "calls not separable"

_ROOT_LABEL = "<root>"


def max_magnitude(reference: np.ndarray) -> float:
    """``max|ref|`` over the finite elements (0 for empty or non-numeric tensors)."""
    ref = np.asarray(reference)
    if not ref.size or not np.issubdtype(ref.dtype, np.number) or ref.dtype == np.bool_:
        return 0.0
    magnitude = float(np.abs(ref).max())
    if np.isfinite(magnitude):
        return magnitude
    finite = np.abs(ref[np.isfinite(ref)])
    return float(finite.max()) if finite.size else 0.0


def layer_tolerance(tol: Tolerance, reference: np.ndarray | float) -> Tolerance:
    """The tolerance of one layer: ``atol + rtol·max|ref_layer|`` absolute, ``rtol`` relative (see module doc).

    ``reference`` is the eager tensor of the layer, or already its ``max|ref|``.
    """
    magnitude = float(reference) if isinstance(reference, (float, int)) else max_magnitude(reference)
    return dataclasses.replace(tol, atol=tol.atol + tol.rtol * magnitude)


@dataclass
class LayerResult:
    """One output of one module call, and how its ONNX counterpart compares with it."""

    name: str
    module: str
    module_type: str
    call: int
    output_index: int
    order: int
    depth: int
    status: LayerStatus
    reason: str = ""
    reason_kind: str = ""
    fused_into: str | None = None
    onnx_node: str | None = None
    onnx_value: str | None = None
    op_type: str | None = None
    shape: tuple[int, ...] = ()
    tolerance: Tolerance | None = None
    metrics: TensorMetrics | None = None
    ref_max_abs: float | None = None
    inputs_from: list[str] = field(default_factory=list)
    absorbed: list[str] = field(default_factory=list)
    kind: Literal["module", "functional"] = "module"
    #: The layer (or input, or functional op) whose value this one is: the same eager tensor (an Identity,
    #: an eval Dropout, a block returning its last child's output). Compared like any layer, but never
    #: reported as the first divergence in its own right: its source comes first and is named instead.
    alias_of: str | None = None

    @property
    def matched(self) -> bool:
        return self.status in ("pass", "fail")

    @property
    def max_abs(self) -> float | None:
        return None if self.metrics is None else self.metrics.max_abs

    @property
    def max_rel(self) -> float | None:
        return None if self.metrics is None else self.metrics.max_rel

    @property
    def status_text(self) -> str:
        """``pass``, ``FAIL``, ``fused into X`` or ``not matched: reason``, as the report prints it."""
        alias = f" (same value as {self.alias_of})" if self.alias_of else ""
        if self.status == "pass":
            return "pass" + alias
        if self.status == "fail":
            return "FAIL" + alias
        if self.status == "fused":
            return f"fused into {self.fused_into or _ROOT_LABEL}" + alias
        if self.status == "not_called":
            return "not called in forward"
        return f"not matched: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "module": self.module,
            "module_type": self.module_type,
            "call": self.call,
            "output_index": self.output_index,
            "order": self.order,
            "depth": self.depth,
            "status": self.status,
            "reason": self.reason,
            "reason_kind": self.reason_kind,
            "fused_into": self.fused_into,
            "onnx_node": self.onnx_node,
            "onnx_value": self.onnx_value,
            "op_type": self.op_type,
            "shape": list(self.shape),
            "tolerance": None if self.tolerance is None else self.tolerance.to_dict(),
            "metrics": None if self.metrics is None else self.metrics.to_dict(),
            "ref_max_abs": self.ref_max_abs,
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "inputs_from": list(self.inputs_from),
            "absorbed": list(self.absorbed),
            "kind": self.kind,
            "alias_of": self.alias_of,
        }


@dataclass(frozen=True)
class FirstDivergence:
    """The first failing layer in execution order, with a one-line explanation."""

    module: str
    name: str
    onnx_node: str | None
    onnx_value: str | None
    op_type: str | None
    max_abs: float
    max_rel: float
    mismatch_fraction: float
    atol: float
    rtol: float
    order: int
    explanation: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "name": self.name,
            "onnx_node": self.onnx_node,
            "onnx_value": self.onnx_value,
            "op_type": self.op_type,
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "mismatch_fraction": self.mismatch_fraction,
            "atol": self.atol,
            "rtol": self.rtol,
            "order": self.order,
            "explanation": self.explanation,
        }


@dataclass
class LayerReport:
    """Every module call of one backend run against eager, in execution order."""

    backend: str
    onnx_path: str
    tolerance: Tolerance
    layers: list[LayerResult] = field(default_factory=list)
    extra_outputs: int = 0
    tolerance_rule: str = "atol_eff = atol + rtol·max|ref_layer|, rtol as given"
    #: The graph outputs of the same (instrumented) run, by name: the output comparison reuses them.
    outputs: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    functional_calls: int = 0
    functional_matched: int = 0

    @property
    def first_divergence(self) -> FirstDivergence | None:
        """The first failing layer that is not an alias (an alias repeats its source, which failed first)."""
        failing = [layer for layer in self.layers if layer.status == "fail"]
        first = next((layer for layer in failing if not layer.alias_of), failing[0] if failing else None)
        return None if first is None else _first_divergence(first, self.layers)

    @property
    def passed(self) -> bool:
        return all(layer.status != "fail" for layer in self.layers)

    @property
    def counts(self) -> dict[str, int]:
        """Module rows by status (the matching quality), and the functional rows beside them.

        ``layers`` counts the module outputs of this run: modules never called are ``not_called`` apart.
        ``aliased`` counts the matched rows whose value is another layer's (already in ``matched``).
        """
        modules = [layer for layer in self.layers if layer.kind == "module" and layer.status != "not_called"]
        statuses = [layer.status for layer in modules]
        functional = [layer.status for layer in self.layers if layer.kind == "functional"]
        return {
            "layers": len(statuses),
            "matched": sum(s in ("pass", "fail") for s in statuses),
            "aliased": sum(layer.matched and bool(layer.alias_of) for layer in modules),
            "not_called": sum(layer.status == "not_called" for layer in self.layers),
            "passed": statuses.count("pass"),
            "failed": statuses.count("fail"),
            "fused": statuses.count("fused"),
            "unmatched": statuses.count("unmatched"),
            "functional": len(functional),
            "functional_failed": functional.count("fail"),
        }

    def to_dict(self) -> dict[str, Any]:
        first = self.first_divergence
        return {
            "backend": self.backend,
            "onnx_path": self.onnx_path,
            "passed": self.passed,
            "tolerance": self.tolerance.to_dict(),
            "tolerance_rule": self.tolerance_rule,
            "extra_outputs": self.extra_outputs,
            "counts": self.counts,
            "functional": {"calls": self.functional_calls, "matched": self.functional_matched},
            "first_divergence": None if first is None else first.to_dict(),
            "layers": [layer.to_dict() for layer in self.layers],
        }


def _effective_sources(layer: LayerResult, by_name: dict[str, LayerResult]) -> list[str]:
    """The layer's input sources, looking through modules fused into it (a folded Conv's own input)."""
    found: list[str] = []
    pending = list(layer.inputs_from)
    seen: set[str] = set()
    while pending:
        src = pending.pop(0)
        if src in seen:
            continue
        seen.add(src)
        fused = by_name.get(src)
        if fused is not None and fused.status == "fused" and fused.fused_into == layer.module:
            pending.extend(fused.inputs_from)
        else:
            found.append(src)
    return found


def _first_divergence(layer: LayerResult, layers: list[LayerResult]) -> FirstDivergence:
    """Describe the first failing layer in one line: what moved, by how much, and where it entered."""
    assert layer.metrics is not None and layer.tolerance is not None  # only failed layers get here
    m = layer.metrics
    by_name = {other.name: other for other in layers}
    sources = _effective_sources(layer, by_name)
    checked = [s for s in sources if s.startswith("input ") or (s in by_name and by_name[s].status == "pass")]
    unchecked = [s for s in sources if s not in checked]
    if sources and not unchecked:
        where = f"its inputs ({', '.join(sources)}) match eager, so the error enters inside it"
    elif unchecked:
        where = f"its input from {', '.join(dict.fromkeys(unchecked))} is not compared, so the error may enter there"
    else:
        where = "it is the first layer compared"
    fused = f"; it also computes {', '.join(layer.absorbed)} (fused into it)" if layer.absorbed else ""
    explanation = (
        f"{layer.name} ({layer.op_type} {layer.onnx_node!r}) is the first layer out of tolerance: max abs "
        f"{m.max_abs:.3g} > atol_eff {layer.tolerance.atol:.3g} on {m.mismatch_fraction:.1%} of elements; "
        f"{where}{fused}"
    )
    return FirstDivergence(
        module=layer.module,
        name=layer.name,
        onnx_node=layer.onnx_node,
        onnx_value=layer.onnx_value,
        op_type=layer.op_type,
        max_abs=m.max_abs,
        max_rel=m.max_rel,
        mismatch_fraction=m.mismatch_fraction,
        atol=layer.tolerance.atol,
        rtol=layer.tolerance.rtol,
        order=layer.order,
        explanation=explanation,
    )
