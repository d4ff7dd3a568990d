"""Typed parts of a gate case's result: its tolerance, output metrics and the first divergent layer.

A :class:`~normfold.gate.cases.CaseResult` crosses process boundaries (pickled to a worker process and
back, or returned by a Ray task) and is rendered by three writers (markdown, HTML, JUnit) and the
baseline. These records carry the numbers with their types through all of that, instead of dicts with
string keys. They are built from numerics' own reports (:class:`~normfold.numerics.metrics.TensorMetrics`,
:class:`~normfold.numerics.layer_report.FirstDivergence`) or from their JSON form, and ``to_dict()``
gives that JSON form back unchanged.

Every field has a default, so a record read back from an older or partial JSON (a stored report, a test
fixture) still builds. Item access (``record["max_abs"]``) and equality with the JSON form stay for
callers written against the dict form; new code reads attributes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

R = TypeVar("R", bound="Record")


class Record:
    """A dataclass readable like the JSON object it renders to (``get``, ``[]``, ``in``)."""

    def __getitem__(self, key: str) -> Any:
        if key not in self._names():
            raise KeyError(key)
        return getattr(self, key)

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self._names():
            raise KeyError(key)
        setattr(self, key, value)

    def __contains__(self, key: object) -> bool:
        return key in self._names()

    def __eq__(self, other: object) -> bool:
        """Equal to a record of the same type or to its JSON form (a dict)."""
        if isinstance(other, dict):
            return self.to_dict() == other
        return type(other) is type(self) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]  # mutable

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self._names() else default

    @classmethod
    def _names(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]

    @classmethod
    def of(cls: type[R], value: Any) -> R:
        """The record for a numerics report, its ``to_dict()`` form, or a record already."""
        if isinstance(value, cls):
            return value
        data = value if isinstance(value, dict) else value.to_dict()
        names = cls._names()
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@dataclass(eq=False)
class OutputMetrics(Record):
    """One graph output against eager (the fields of :class:`~normfold.numerics.metrics.TensorMetrics`)."""

    name: str = ""
    shape: list[int] = field(default_factory=list)
    expected_shape: list[int] = field(default_factory=list)
    dtype: str = ""
    expected_dtype: str = ""
    shape_ok: bool = True
    dtype_ok: bool = True
    max_abs: float = 0.0
    mean_abs: float = 0.0
    max_rel: float = 0.0
    cosine: float = 1.0
    rel_l2: float = 0.0
    mismatch_fraction: float = 0.0
    atol: float = 0.0
    rtol: float = 0.0
    passed: bool = True
    reason: str = ""
    nonfinite: int = 0
    expected_nonfinite: int = 0
    atol_eff: float | None = None

    def describe(self) -> str:
        """``max_abs=… max_rel=… cosine=… mismatch=… (atol=…, rtol=…, atol_eff=…)``: why it failed."""
        return (
            f"max_abs={self.max_abs:.3g} max_rel={self.max_rel:.3g} cosine={self.cosine:.6f} "
            f"mismatch={self.mismatch_fraction:.2%} "
            f"(atol={self.atol:g}, rtol={self.rtol:g}, atol_eff={self.atol_eff or self.atol:.3g})"
        )


@dataclass(eq=False)
class Divergence(Record):
    """The first layer out of tolerance (the fields of :class:`~normfold.numerics.layer_report.FirstDivergence`)."""

    module: str = ""
    name: str = ""
    onnx_node: str | None = None
    onnx_value: str | None = None
    op_type: str | None = None
    max_abs: float | None = None
    max_rel: float | None = None
    mismatch_fraction: float | None = None
    atol: float | None = None
    rtol: float | None = None
    order: int | None = None
    explanation: str = ""

    def describe(self) -> str:
        """One line: where the numbers first went wrong, and by how much."""
        where = self.name or self.module or self.onnx_node or "?"
        op = f" ({self.op_type})" if self.op_type else ""
        node = f" at ONNX node {self.onnx_node}" if self.onnx_node and self.module else ""
        numbers = [(k, v) for k, v in (("max_abs", self.max_abs), ("max_rel", self.max_rel)) if v is not None]
        metrics = ", ".join(f"{k}={v:.3g}" for k, v in numbers)
        return f"first divergent layer: {where}{op}{node}" + (f" ({metrics})" if metrics else "")


@dataclass(eq=False)
class CaseTolerance(Record):
    """The tolerance a case was judged with (the fields of :class:`~normfold.numerics.tolerances.Tolerance`)."""

    atol: float = 0.0
    rtol: float = 0.0
    min_cosine: float | None = None
    allow_nonfinite: bool = False
