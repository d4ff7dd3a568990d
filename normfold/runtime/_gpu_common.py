"""What the two GPU runtime modules share: the cache directory, the fp16/bf16 model to load, input-shape
reading and TensorRT optimization profiles (used by ``ort-trt``'s profile options and ``trt``'s engine).

Both :mod:`normfold.runtime.onnxruntime_gpu` and :mod:`normfold.runtime.tensorrt` import from here and
never from each other. Everything here is pure (no GPU) and unit-tested on the CPU.

A profile is ``input name → (min, opt, max)``. It must cover the shapes that will really be run: an
engine built for batch 1 rejects a batch-2 feed in ``set_input_shape``. So profiles come either from
what the caller declares (``SessionOptions.batch_sizes`` and ``dim_values``, e.g. bench's ``--batch``
and ``--input``) or, when nothing is declared, from the first feed itself (:func:`profile_for_feeds`),
and :func:`widen_profile` grows one that a later feed falls outside of.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from normfold.errors import InputSpecError, UsageError
from normfold.runtime.base import SessionOptions

DEFAULT_CACHE_DIR = Path(tempfile.gettempdir()) / "normfold-cache"

Dim = int | str | None
ShapeSpec = tuple[Dim, ...]
Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]
"""input name → (min, opt, max) shapes."""

LOW_PRECISIONS: tuple[str, ...] = ("fp16", "bf16")


def flag(value: bool) -> str:
    """ORT provider options are strings: ``True`` → ``"1"``."""
    return "1" if value else "0"


def onnx_input_shapes(onnx_path: str | Path) -> dict[str, ShapeSpec]:
    """Graph inputs (initializers excluded) → dims: int, symbolic name, or None when unnamed and unknown."""
    from normfold.onnx_files import read_graph

    model = read_graph(onnx_path)  # external-data locations checked before the parser follows them
    initializers = {t.name for t in model.graph.initializer}
    shapes: dict[str, ShapeSpec] = {}
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        dims: list[Dim] = []
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or None)
        shapes[vi.name] = tuple(dims)
    return shapes


def is_dynamic(input_shapes: Mapping[str, ShapeSpec]) -> bool:
    return any(not isinstance(d, int) for shape in input_shapes.values() for d in shape)


def dim_values_from_shapes(shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """User shapes (``--input x:1x128``) → ``{"x:0": 1, "x:1": 128}``, the ``dim_values`` keys."""
    return {f"{name}:{axis}": int(d) for name, shape in shapes.items() for axis, d in enumerate(shape)}


def _resolve(name: str, shape: ShapeSpec, values: Mapping[str, int]) -> list[int | None]:
    """Static dims as they are, the batch axis (0) as None, any other dynamic dim from ``values``."""
    resolved: list[int | None] = []
    for axis, d in enumerate(shape):
        if isinstance(d, int):
            resolved.append(d)
        elif axis == 0:
            resolved.append(None)
        elif d is not None and d in values:
            resolved.append(int(values[d]))
        elif f"{name}:{axis}" in values:
            resolved.append(int(values[f"{name}:{axis}"]))
        else:
            raise InputSpecError(
                f"input {name!r} axis {axis} is dynamic ({d or 'unnamed'}) and not the batch axis; "
                f"give its size (dim_values={{{(d or f'{name}:{axis}')!r}: N}}, CLI: --input)"
            )
    return resolved


def build_profiles(
    input_shapes: Mapping[str, ShapeSpec],
    batch_sizes: Sequence[int],
    *,
    dim_values: Mapping[str, int] | None = None,
    per_batch: bool = False,
) -> list[Profile]:
    """Optimization profiles for the dynamic axes of ``input_shapes``.

    The first dim of an input, when dynamic, is the batch: min = smallest requested batch, opt = max =
    largest (throughput is tuned for the largest batch), or with ``per_batch`` one exact profile per
    size. Any other dynamic dim must be fixed through ``dim_values`` (keyed by the symbolic name, or by
    ``"input:axis"``), else the error names it. Static inputs appear in no profile; a model without
    dynamic axes gets ``[{}]`` (one implicit profile).
    """
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise UsageError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    values = dict(dim_values or {})
    sizes = sorted(set(batch_sizes))
    fixed = {n: _resolve(n, s, values) for n, s in input_shapes.items() if not all(isinstance(d, int) for d in s)}

    def shape_for(resolved: list[int | None], batch: int) -> Shape:
        return tuple(batch if d is None else d for d in resolved)

    if not fixed:
        return [{}]
    groups = [[b] for b in sizes] if per_batch else [sizes]
    return [
        {n: (shape_for(r, g[0]), shape_for(r, g[-1]), shape_for(r, g[-1])) for n, r in fixed.items()} for g in groups
    ]


def profile_for_feeds(input_shapes: Mapping[str, ShapeSpec], feeds: Mapping[str, Sequence[int]]) -> Profile:
    """One exact profile (min = opt = max) for the shapes of the feeds that are about to run.

    Used when the caller declared no batch sizes: the engine is built for what it is fed, not for an
    assumed batch of 1. Static inputs are left out (they need no profile entry).
    """
    profile: Profile = {}
    for name, spec in input_shapes.items():
        if all(isinstance(d, int) for d in spec):
            continue
        if name not in feeds:
            raise InputSpecError(f"input {name!r} is dynamic and was not fed; cannot size its profile")
        shape = tuple(int(d) for d in feeds[name])
        if len(shape) != len(spec):
            raise InputSpecError(
                f"input tensor: {name} | received rank {len(shape)}; expected rank {len(spec)} ({spec})"
            )
        profile[name] = (shape, shape, shape)
    return profile


def covers(profiles: Sequence[Profile], feeds: Mapping[str, Sequence[int]]) -> bool:
    """True when one profile admits every fed shape (each dim within [min, max])."""
    for profile in profiles:
        if all(
            name in feeds
            and len(feeds[name]) == len(lo)
            and all(a <= d <= b for a, d, b in zip(lo, feeds[name], hi, strict=True))
            for name, (lo, _, hi) in profile.items()
        ):
            return True
    return False


def widen_profile(profile: Profile, feeds: Mapping[str, Sequence[int]]) -> Profile:
    """``profile`` grown to admit ``feeds`` too: per dim min of mins and max of maxes; opt = the new max."""
    out: Profile = {}
    for name, (lo, _, hi) in profile.items():
        shape = tuple(int(d) for d in feeds.get(name, lo))
        if len(shape) != len(lo):
            raise InputSpecError(f"input tensor: {name} | received rank {len(shape)}; expected rank {len(lo)}")
        new_lo = tuple(min(a, d) for a, d in zip(lo, shape, strict=True))
        new_hi = tuple(max(b, d) for b, d in zip(hi, shape, strict=True))
        out[name] = (new_lo, new_hi, new_hi)
    return out


def converted_model(onnx_path: Path, options: SessionOptions) -> Path:
    """``onnx_path`` itself for fp32/tf32, else its fp16/bf16 conversion by ``options.convert``.

    The conversion (fp32 norm islands, fp32 I/O kept, cached by content hash) is a graph pass, which the
    runtime layer never imports: the caller injects it (:attr:`SessionOptions.convert`, normally
    :func:`normfold.fusers.precision.model_for_precision`). Without it a low precision is refused rather
    than run silently at fp32.
    """
    precision = options.precision
    if precision in ("fp32", "tf32"):
        return onnx_path
    if precision not in LOW_PRECISIONS:
        raise UsageError(f"precision {precision!r} is not one of fp32, tf32, fp16, bf16")
    if options.convert is None:
        raise UsageError(
            f"{precision} on a GPU backend runs a converted model, and these SessionOptions carry no converter; "
            "pass SessionOptions(convert=normfold.fusers.precision.model_for_precision)"
        )
    return options.convert(onnx_path, precision, options.cache_dir or DEFAULT_CACHE_DIR)
