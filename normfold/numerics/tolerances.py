"""Default tolerances per precision: the one documented place.

The check for every element is ``|a - b| <= atol + rtol·|b|`` (``b`` is the eager reference); pure
relative error is meaningless near zero. Figures from ../shared/NORMS.md §5, measured on a
ResNet-18-style model (max |y| = 1.8):

* fp32, ORT CPU, folded or not: max-abs 2–3.4e-6 against torch fp32. Folding BN moves results by about
  1e-6, so ``atol=1e-5, rtol=1e-4`` never flags a correct fold while a 1% weight fault (≥1e-3) fails.
* tf32 (emulated): 3.3e-3 → ``1e-2/1e-2`` plus cosine ≥ 0.9999.
* fp16: 5.2e-3 (2.9e-3 of max) → ``1e-2/1e-2`` plus cosine ≥ 0.999.
* bf16: 3.8e-2 → ``5e-2/5e-2`` plus cosine ≥ 0.99.

Per-layer comparisons use the same numbers; see :mod:`normfold.numerics.layers` for how they grow with depth.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from normfold.errors import UsageError


@dataclass(frozen=True)
class Tolerance:
    """``|a-b| <= atol + rtol·|b|`` element-wise, plus an optional floor on cosine similarity.

    ``allow_nonfinite``: NaN/Inf found at the same place with the same value on both sides count as
    equal. Off by default: a model that produces NaN on the test inputs has not been checked at all.
    """

    atol: float
    rtol: float
    min_cosine: float | None = None
    allow_nonfinite: bool = False

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)

    def describe(self) -> str:
        cos = f", cosine ≥ {self.min_cosine}" if self.min_cosine is not None else ""
        return f"atol={self.atol:g}, rtol={self.rtol:g}{cos}"


DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(atol=1e-5, rtol=1e-4),
    "tf32": Tolerance(atol=1e-2, rtol=1e-2, min_cosine=0.9999),
    "fp16": Tolerance(atol=1e-2, rtol=1e-2, min_cosine=0.999),
    "bf16": Tolerance(atol=5e-2, rtol=5e-2, min_cosine=0.99),
}


def tolerance_for(
    precision: str, atol: float | None = None, rtol: float | None = None, *, allow_nonfinite: bool = False
) -> Tolerance:
    """The default tolerance of ``precision`` with any explicit ``atol``/``rtol`` overriding it."""
    try:
        base = DEFAULT_TOLERANCES[precision]
    except KeyError:
        raise UsageError(f"unknown precision {precision!r}; expected one of {', '.join(DEFAULT_TOLERANCES)}") from None
    for label, value in (("atol", atol), ("rtol", rtol)):
        if value is not None and (value < 0 or value != value):
            raise UsageError(f"{label} must be a non-negative number, got {value}")
    return Tolerance(
        atol=base.atol if atol is None else float(atol),
        rtol=base.rtol if rtol is None else float(rtol),
        min_cosine=base.min_cosine,
        allow_nonfinite=allow_nonfinite,
    )


#: What decides a verdict by default. At fp32/tf32 a correct graph keeps every layer within
#: ``atol + rtol·max|ref_layer|``, so a layer out of it is a fault even when the outputs hide it (pooling,
#: ReLU). fp16: correct ``normfold convert`` results of the whole zoo kept every layer at ≤ 0.32 of its
#: fp16 tolerance on ORT CPU (benchmarks/fp16_layers.py; a lower bound, ORT CPU widens some fp16 kernels),
#: so layers decide there too. bf16: the instrumented per-layer copy does not load on ORT CPU (no bf16
#: kernels for the exposed values), so nothing was measured and the outputs keep deciding.
DEFAULT_FAIL_ON: dict[str, str] = {"fp32": "layers", "tf32": "layers", "fp16": "layers", "bf16": "outputs"}
FAIL_ON_CHOICES = ("layers", "outputs")


def fail_on_for(precision: str, fail_on: str | None = None) -> str:
    """``fail_on`` when given (validated), else the precision's default (``layers`` for fp32/tf32)."""
    if fail_on is None:
        return DEFAULT_FAIL_ON.get(precision, "outputs")
    if fail_on not in FAIL_ON_CHOICES:
        raise UsageError(f"fail_on must be one of {', '.join(FAIL_ON_CHOICES)}, got {fail_on!r}")
    return fail_on


def output_tolerance(tol: Tolerance, reference: object) -> Tolerance:
    """The tolerance one output is judged under: ``atol_eff = atol + rtol·max|ref_output|``, ``rtol`` as given.

    The same magnitude-aware rule as every layer's (:func:`normfold.numerics.layers.layer_tolerance`), for
    the same reason: rounding error is relative to the size of the values summed into an element, not to
    the element, so an output element that cancels to ~0 carries the absolute error of its neighbours.
    The element-wise ``atol + rtol·|ref|`` flagged BN-folding noise of 1.45e-5 on such an element of
    torchvision regnet_x_400mf; measured margins for both rules: benchmarks/gate_real_models.py.
    """
    import numpy as np

    ref = np.asarray(reference)
    magnitude = 0.0
    if ref.size and np.issubdtype(ref.dtype, np.number) and ref.dtype != np.bool_:
        finite = np.abs(ref[np.isfinite(ref)]) if not np.isfinite(ref).all() else np.abs(ref)
        magnitude = float(finite.max()) if finite.size else 0.0
    return Tolerance(
        atol=tol.atol + tol.rtol * magnitude,
        rtol=tol.rtol,
        min_cosine=tol.min_cosine,
        allow_nonfinite=tol.allow_nonfinite,
    )
