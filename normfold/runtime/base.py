"""The one Backend interface (Polygraphy's loader/runner split, typed).

* :class:`Backend` is cheap to construct. ``status()`` probes whether it can really run here and says
  exactly why not; ``load()`` lazily builds the expensive thing (an ORT session, a TensorRT engine) and
  returns a :class:`Runner`.
* :class:`Runner` is a context manager. The public :meth:`Runner.infer` validates the feeds against
  the model's inputs (names, ranks, static dims, dtypes) and then calls the subclass's ``infer_impl``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Literal

import numpy as np

from normfold.errors import BackendUnavailableError, InputSpecError

Precision = Literal["fp32", "tf32", "fp16", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "fp16", "bf16")
"""``tf32``: fp32 tensors, TF32 matmul/conv math (GPU backends only; its own tolerances)."""

PrecisionConverter = Callable[[Path, str, Path], Path]
"""``(onnx_path, precision, cache_dir) -> converted path``: an fp32 model as fp16/bf16 with fp32 norm islands."""


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run here; ``reason`` says exactly why not (empty when available)."""

    name: str
    available: bool
    reason: str
    description: str = ""
    precisions: tuple[str, ...] = ("fp32",)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "precisions": list(self.precisions)}


@dataclass
class SessionOptions:
    """Options shared by the ONNX backends; each backend documents which ones it honours."""

    precision: str = "fp32"
    graph_optimization_level: str = "all"  # disable | basic | extended | layout | all
    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    provider_options: dict[str, Any] = field(default_factory=dict)
    io_binding: bool = True
    cuda_graph: bool = False
    cache_dir: Path | None = None
    batch_sizes: tuple[int, ...] = ()
    #: Sizes of dynamic non-batch axes for TensorRT profiles, by symbolic name or ``"input:axis"``.
    dim_values: dict[str, int] = field(default_factory=dict)
    extra_outputs: tuple[str, ...] = ()
    #: How a GPU backend gets its fp16/bf16 model from the fp32 one. Injected by the layers above runtime
    #: (:func:`normfold.fusers.precision.model_for_precision`: compare, bench, the gate, triton), so that
    #: runtime imports no graph pass; a low-precision GPU load without it is a :class:`UsageError`.
    convert: PrecisionConverter | None = None


@dataclass(frozen=True)
class TensorMeta:
    """Name, shape (ints for static dims, strings/None for dynamic ones) and numpy dtype of a tensor."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: np.dtype

    def describe(self) -> str:
        dims = "x".join("?" if not isinstance(d, int) else str(d) for d in self.shape)
        return f"{self.name}:{dims}:{self.dtype}"


class Runner(abc.ABC):
    """A loaded model that can run inference; use as a context manager."""

    backend: str = ""
    #: Whether latency measured around :meth:`infer` includes host↔device copies.
    copies_included: bool = False

    def __init__(self, inputs: list[TensorMeta], outputs: list[TensorMeta]) -> None:
        self.inputs = inputs
        self.outputs = outputs

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def __enter__(self) -> Runner:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the session or engine."""

    def validate(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check names, rank, static dims and dtype of every feed; say what was received and expected."""
        missing = [t.name for t in self.inputs if t.name not in feeds]
        extra = sorted(set(feeds) - {t.name for t in self.inputs})
        if missing or extra:
            raise InputSpecError(
                f"inputs do not match the model: missing {missing or 'none'}, unexpected {extra or 'none'}; "
                f"expected {[t.describe() for t in self.inputs]}"
            )
        out: dict[str, np.ndarray] = {}
        for meta in self.inputs:
            arr = np.asarray(feeds[meta.name])
            ok = arr.ndim == len(meta.shape) and all(
                not isinstance(d, int) or d == s for d, s in zip(meta.shape, arr.shape, strict=False)
            )
            if not ok:
                raise InputSpecError(
                    f"input tensor: {meta.name} | received incompatible shape: {tuple(arr.shape)}; "
                    f"expected a shape compatible with: {meta.describe()}"
                )
            if arr.dtype != meta.dtype:
                raise InputSpecError(f"input tensor: {meta.name} | received dtype {arr.dtype}; expected {meta.dtype}")
            out[meta.name] = arr
        return out

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate ``feeds`` and run the model once; returns outputs by name, as host numpy arrays."""
        return self.infer_impl(self.validate(feeds))

    @abc.abstractmethod
    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on already-validated feeds."""


class Backend(abc.ABC):
    """A way to run an ONNX model: a probe plus a lazy loader."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)

    @abc.abstractmethod
    def probe(self) -> str | None:
        """None when the backend can run here, else the precise reason it cannot."""

    def status(self) -> BackendStatus:
        reason = self.probe()
        return BackendStatus(self.name, reason is None, reason or "", self.description, self.precisions)

    def ensure_available(self, precision: str = "fp32") -> None:
        """Raise :class:`BackendUnavailableError` with the probe's reason when this backend can't run."""
        reason = self.probe()
        if reason is not None:
            raise BackendUnavailableError(f"backend {self.name!r} cannot run here: {reason}")
        if precision not in self.precisions:
            raise BackendUnavailableError(
                f"backend {self.name!r} does not run precision {precision!r} (it runs {', '.join(self.precisions)})"
            )

    @abc.abstractmethod
    def load(self, onnx_path: str | Path, options: SessionOptions | None = None) -> Runner:
        """Build a runner for ``onnx_path`` (raises BackendUnavailableError when it cannot run here)."""
