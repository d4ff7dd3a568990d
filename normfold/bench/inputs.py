"""Benchmark inputs: the ONNX file's input metadata, batch sizes and the shapes fed at each.

Static dimensions are kept; the batch dimension (0) takes the requested batch size; other dynamic
dimensions need an explicit shape (``inputs``), checked against the file before anything runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from normfold.errors import InputSpecError
from normfold.io import load_onnx
from normfold.runtime.base import TensorMeta

Shape = tuple[int, ...]


def onnx_input_metas(onnx_path: str | Path) -> list[TensorMeta]:
    """The graph inputs of an ONNX file (initializers excluded), loaded and checked by :func:`load_onnx`."""
    from onnx import helper

    model = load_onnx(onnx_path, load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    metas: list[TensorMeta] = []
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        tt = vi.type.tensor_type
        dims: list[int | str | None] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or None)
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except (KeyError, TypeError, ValueError) as e:
            raise InputSpecError(
                f"input {vi.name} has ONNX element type {tt.elem_type}, which numpy cannot hold"
            ) from e
        metas.append(TensorMeta(vi.name, tuple(dims), dtype))
    return metas


def describe_shape(shape: Sequence[int | str | None]) -> str:
    return "x".join(str(d) if isinstance(d, int) else "?" for d in shape)


def check_overrides(metas: Sequence[TensorMeta], overrides: Mapping[str, Shape]) -> None:
    """``--input`` shapes must name model inputs and fit their rank and static dims (dim 0 excepted)."""
    by_name = {m.name: m for m in metas}
    unknown = sorted(set(overrides) - set(by_name))
    if unknown:
        known = [m.describe() for m in metas]
        raise InputSpecError(f"--input names {unknown} are not model inputs; the model has {known}")
    for name, shape in overrides.items():
        meta = by_name[name]
        ok = len(shape) == len(meta.shape) and all(
            not isinstance(d, int) or d == s for i, (d, s) in enumerate(zip(meta.shape, shape, strict=True)) if i > 0
        )
        if not ok:
            raise InputSpecError(
                f"input tensor: {name} | received incompatible shape: {describe_shape(shape)}; "
                f"expected a shape compatible with: {meta.describe()} (dimension 0 is set by --batch)"
            )


def default_batch_size(metas: Sequence[TensorMeta], overrides: Mapping[str, Shape]) -> int:
    """The model's own batch size: the first static dimension 0, else the ``--input`` one, else 1."""
    for meta in metas:
        if meta.shape and isinstance(meta.shape[0], int):
            return int(meta.shape[0])
    for meta in metas:
        shape = overrides.get(meta.name)
        if shape:
            return int(shape[0])
    return 1


def batch_shapes(metas: Sequence[TensorMeta], batch_size: int, overrides: Mapping[str, Shape]) -> dict[str, Shape]:
    """Concrete input shapes at ``batch_size``: dimension 0 of every input of rank ≥ 1 becomes the batch.

    A static dimension 0 that differs from ``batch_size`` raises :class:`InputSpecError`: the model was
    exported for one batch size (re-export with ``--dynamic-batch``). Other dynamic dimensions come from
    ``overrides`` (``--input``) or raise.
    """
    shapes: dict[str, Shape] = {}
    for meta in metas:
        if not meta.shape:
            shapes[meta.name] = ()
            continue
        dim0 = meta.shape[0]
        if isinstance(dim0, int) and dim0 != batch_size:
            raise InputSpecError(
                f"input {meta.describe()} has a static batch dimension of {dim0}, so it cannot run at batch size "
                f"{batch_size}; re-export with --dynamic-batch or bench with --batch {dim0}"
            )
        given = overrides.get(meta.name)
        rest: list[int] = []
        for i, d in enumerate(meta.shape[1:], start=1):
            if given is not None:
                rest.append(int(given[i]))
            elif isinstance(d, int):
                rest.append(d)
            else:
                example = "x".join(["1"] + [str(x) if isinstance(x, int) else "8" for x in meta.shape[1:]])
                raise InputSpecError(
                    f"input {meta.describe()} has dynamic dimension {i} ({d or '?'}); give its shape with "
                    f"--input {meta.name}:{example}"
                )
        shapes[meta.name] = (batch_size, *rest)
    return shapes
