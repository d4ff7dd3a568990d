"""Run one backend on an ONNX file with real (npz) or seeded random inputs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from normfold._memory import ensure_inputs_fit
from normfold.errors import InputSpecError
from normfold.io import atomic_open, load_npz
from normfold.runtime.base import SessionOptions, TensorMeta
from normfold.runtime.registry import get_backend


@dataclass
class RunReport:
    """Summary of one run: where the inputs came from and per-output statistics."""

    onnx_path: str
    backend: str
    input_source: str
    inputs: dict[str, list[int]]
    outputs: list[dict[str, Any]] = field(default_factory=list)
    output_file: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def random_feeds(
    metas: Sequence[TensorMeta],
    overrides: dict[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    dynamic_dim: int | None = None,
) -> dict[str, np.ndarray]:
    """Seeded standard-normal floats (small non-negative ints for integer inputs) of each input's shape.

    A dynamic dimension needs an override, unless ``dynamic_dim`` gives the size to use for all of them.
    Values are drawn in the input's own dtype (float32 stays float32, never float64 then cast), after
    checking that all inputs together fit in memory.
    """
    rng = np.random.default_rng(seed)
    overrides = overrides or {}
    shapes = [_feed_shape(meta, overrides, dynamic_dim) for meta in metas]
    ensure_inputs_fit([(m.name, shape, np.dtype(m.dtype).itemsize) for m, shape in zip(metas, shapes, strict=True)])
    feeds: dict[str, np.ndarray] = {}
    for meta, shape in zip(metas, shapes, strict=True):
        if meta.dtype in (np.float32, np.float64):
            feeds[meta.name] = rng.standard_normal(shape, dtype=meta.dtype)
        elif np.issubdtype(meta.dtype, np.floating):
            feeds[meta.name] = rng.standard_normal(shape, dtype=np.float32).astype(meta.dtype)
        elif meta.dtype == np.bool_:
            feeds[meta.name] = rng.integers(0, 2, shape, dtype=np.uint8).astype(np.bool_)
        else:
            feeds[meta.name] = rng.integers(0, 10, shape, dtype=meta.dtype)
    return feeds


def _feed_shape(meta: TensorMeta, overrides: dict[str, tuple[int, ...]], dynamic_dim: int | None) -> tuple[int, ...]:
    """The concrete shape to feed ``meta``: its override, its dims with ``dynamic_dim``, or its static dims."""
    shape = overrides.get(meta.name)
    if shape is None and dynamic_dim is not None:
        shape = tuple(d if isinstance(d, int) and d > 0 else dynamic_dim for d in meta.shape)
    if shape is None:
        if not all(isinstance(d, int) for d in meta.shape):
            raise InputSpecError(
                f"input {meta.describe()} has dynamic dimensions; give its shape with --input "
                f"{meta.name}:{'x'.join(str(d) if isinstance(d, int) else '1' for d in meta.shape)}"
            )
        shape = tuple(int(d) for d in meta.shape)  # type: ignore[arg-type]
    return tuple(shape)


def save_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write ``arrays`` to an .npz atomically (numpy would otherwise append .npz to other names)."""
    with atomic_open(path, "wb") as fh:
        savez: Any = np.savez  # numpy's stub reads **arrays as its allow_pickle flag
        savez(fh, **arrays)
    return Path(path)


def run_onnx(
    onnx_path: str | Path,
    backend: str = "ort-cpu",
    *,
    inputs_npz: str | Path | None = None,
    input_specs: Sequence[str] | None = None,
    seed: int = 0,
    output: str | Path | None = None,
    options: SessionOptions | None = None,
) -> RunReport:
    """Run ``onnx_path`` once on ``backend``; optionally save the outputs to an npz."""
    from normfold.io import load_onnx

    load_onnx(onnx_path, load_external_data=False)  # clear error for a bad file before any backend work
    be = get_backend(backend)
    overrides: dict[str, tuple[int, ...]] = {}
    if input_specs:
        from normfold.models.loader import parse_input_spec

        overrides = {s.name: s.shape for s in (parse_input_spec(t) for t in input_specs)}
    with be.load(onnx_path, options) as runner:
        unknown = sorted(set(overrides) - set(runner.input_names))
        if unknown:
            raise InputSpecError(f"--input names {unknown} are not model inputs {runner.input_names}")
        if inputs_npz is not None:
            feeds, source = load_npz(inputs_npz), f"npz {inputs_npz}"
        else:
            feeds, source = random_feeds(runner.inputs, overrides, seed), f"seeded random (seed {seed})"
        produced = runner.infer(feeds)
    report = RunReport(
        onnx_path=str(onnx_path),
        backend=backend,
        input_source=source,
        inputs={k: list(v.shape) for k, v in feeds.items()},
    )
    for name, arr in produced.items():
        a = np.asarray(arr, dtype=np.float64) if arr.size else np.zeros(1)
        report.outputs.append(
            {
                "name": name,
                "shape": list(arr.shape),
                "dtype": str(arr.dtype),
                "min": float(a.min()),
                "max": float(a.max()),
                "mean": float(a.mean()),
            }
        )
    if output is not None:
        save_npz(output, produced)
        report.output_file = str(output)
    return report
