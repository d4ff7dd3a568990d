"""ONNX files with external data: the one place that resolves, loads and saves them.

Why one home: a model's ``external_data`` locations are attacker-controlled text. Every command that
reads or copies weights (the loader, ORT sessions, per-layer scratch copies, Triton repositories) goes
through :func:`resolve_external_data`, which applies the rules onnx's checker added for
CVE-2024-27318/27319: a location is relative, normalised, free of ``..``, stays inside the model's
folder after symlinks are resolved, and names a regular file (with the tensor's bytes inside it).

Memory: models beyond protobuf's 2 GiB limit cannot be held as one proto. :func:`load_ir` reads the
graph without its data and lets onnx-ir memory-map each external tensor, so a pass that rewrites a few
tensors never copies the others; :func:`save_ir` streams tensors into a data file beside the model.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from normfold.errors import OnnxLoadError, UsageError

if TYPE_CHECKING:
    import onnx_ir as ir

logger = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31 - 1
"""protobuf refuses to serialize a message at or above 2 GiB."""

INLINE_LIMIT = 1_800_000_000
"""Above this many bytes of tensors a model is saved with external data (margin below the limit).
The environment variable ``NORMFOLD_INLINE_LIMIT`` overrides it (``0``: always external)."""

SIZE_THRESHOLD = 1024
"""Tensors smaller than this stay inline when a model is saved with external data (shapes, scalars)."""


def inline_limit() -> int:
    """:data:`INLINE_LIMIT`, or ``NORMFOLD_INLINE_LIMIT`` when set."""
    raw = os.environ.get("NORMFOLD_INLINE_LIMIT", "").strip()
    if not raw:
        return INLINE_LIMIT
    try:
        return int(raw)
    except ValueError as e:
        raise UsageError(f"NORMFOLD_INLINE_LIMIT={raw!r} is not a number of bytes") from e


@dataclass(frozen=True)
class ExternalRef:
    """One tensor's external data: where the model says it is and where it really is."""

    tensor: str
    location: str
    path: Path
    offset: int
    length: int | None


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of ``graph`` and its subgraphs: initializers, sparse parts, node attributes."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from _graph_tensors(sub)


def model_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of the model, functions included."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors


def _fields(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _refuse(tensor: str, location: str, why: str) -> OnnxLoadError:
    return OnnxLoadError(
        f"tensor {tensor!r} refers to external data {location!r}, which {why}; "
        "external data must be a regular file inside the model's folder, named by a relative path"
    )


def location_parts(location: str) -> list[str]:
    """A location's components, normalised: ``a/./b``, ``a//b`` and ``a\\b`` are all ``a/b``."""
    return [p for p in location.replace("\\", "/").split("/") if p not in ("", ".")]


def resolve_location(model_dir: Path, tensor: str, location: str) -> Path:
    """The real path of ``location`` for ``tensor``, or an :class:`OnnxLoadError` saying which rule broke.

    The checks are lexical first (so ``../../etc/passwd`` is refused without touching the file system),
    then on the resolved path (so a symlink cannot lead out of the folder).
    """
    if not location or "\x00" in location:
        raise _refuse(tensor, location, "is empty or not a path")
    posix = location.replace("\\", "/")
    drive = len(posix) > 1 and posix[0].isalpha() and posix[1] == ":"
    if os.path.isabs(location) or posix.startswith("/") or drive:
        raise _refuse(tensor, location, "is an absolute path")
    parts = location_parts(location)
    if ".." in parts:
        raise _refuse(tensor, location, "leaves the model's folder ('..')")
    if not parts:
        raise _refuse(tensor, location, "names the model's folder itself")
    root = model_dir.resolve()
    candidate = root.joinpath(*parts)
    real = candidate.resolve()
    if not real.is_relative_to(root) or real == root:
        raise _refuse(tensor, location, f"resolves to {str(real)!r}, outside {str(root)!r}")
    if not real.exists():
        raise _refuse(tensor, location, "does not exist next to the model")
    if not real.is_file():
        raise _refuse(tensor, location, "is not a regular file")
    return real


def resolve_external_data(model: onnx.ModelProto, model_path: str | os.PathLike[str]) -> list[ExternalRef]:
    """Check every external tensor of ``model`` (read from ``model_path``) and return where its bytes are.

    Besides the location rules of :func:`resolve_location`, ``offset``/``length`` must lie inside the file:
    a truncated data file is named here rather than failing later inside a memory map or ORT.
    """
    model_dir = Path(model_path).parent
    refs: list[ExternalRef] = []
    resolved: dict[str, Path] = {}
    for tensor in model_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        fields = _fields(tensor)
        location = fields.get("location", "")
        path = resolved.get(location) or resolve_location(model_dir, tensor.name, location)
        resolved[location] = path
        try:
            offset = int(fields.get("offset", "0"))
            length = int(fields["length"]) if "length" in fields else None
        except ValueError as e:
            raise _refuse(tensor.name, location, "has a non-integer offset or length") from e
        size = path.stat().st_size
        end = offset + (length if length is not None else 0)
        if offset < 0 or (length is not None and length < 0) or end > size:
            raise _refuse(tensor.name, location, f"is {size} bytes, too short for offset {offset} + length {length}")
        refs.append(ExternalRef(tensor.name, location, path, offset, length))
    return refs


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model_tensors(model))


def read_graph(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """The model at ``path`` without its external data, with every external location checked.

    Cheap for a model of any size (the graph only); what runtimes use before opening the file.
    """
    p = Path(path)
    if not p.exists():
        raise OnnxLoadError(f"ONNX file not found: {p}")
    if p.is_dir():
        raise OnnxLoadError(f"expected an ONNX file, got a directory: {p}")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, RuntimeWarning, etc.
        raise OnnxLoadError(f"{p} is not a readable ONNX model ({type(e).__name__}: {e})") from e
    if not model.graph.node and not model.graph.output:
        raise OnnxLoadError(f"{p} is not a valid ONNX model: its graph is empty")
    resolve_external_data(model, p)
    return model


def check_file(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """:func:`read_graph` plus onnx's checker run on the path (it reads the graph, never the weights)."""
    model = read_graph(path)
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OnnxLoadError(f"{path} is not a valid ONNX model: {first}") from e
    return model


def load_proto(path: str | os.PathLike[str], *, with_data: bool = True) -> onnx.ModelProto:
    """The checked model as one proto; ``with_data`` reads external tensors into it (only for models that
    fit protobuf's limit: converters that rewrite every tensor)."""
    model = check_file(path)
    if with_data and has_external_data(model):
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(model, str(Path(path).parent))
    return model


def load_ir(path: str | os.PathLike[str]) -> ir.Model:
    """The checked model as onnx-ir, external tensors memory-mapped (read on first use, never copied)."""
    import onnx_ir as ir
    from onnx_ir import external_data

    model = check_file(path)
    try:
        loaded = ir.serde.deserialize_model(model)
    except Exception as e:  # onnx_ir raises SerdeError wrapping many causes
        raise OnnxLoadError(f"'{path}' is not a valid ONNX model: {e}") from e
    external_data.set_base_dir(loaded.graph, str(Path(path).parent.resolve()))
    return loaded


def tensor_bytes(model: ir.Model) -> int:
    """Bytes of every initializer (external ones included, without reading them)."""
    return sum(v.const_value.nbytes for g in model.graphs() for v in g.initializers.values() if v.const_value)


def is_external(model: ir.Model) -> bool:
    import onnx_ir as ir

    return any(isinstance(v.const_value, ir.ExternalTensor) for g in model.graphs() for v in g.initializers.values())


def release_mapped(model: ir.Model) -> None:
    """Unmap every external tensor's file (each is mapped again on its next use): the pages it read stop
    counting against this process while, say, ORT loads the same weights."""
    import onnx_ir as ir

    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                value.const_value.release()


def data_file_name(target: Path) -> str:
    """The external-data file of ``target``: ``NAME.data`` beside it (the torch exporter's convention)."""
    return target.name + ".data"


def save_ir(model: ir.Model, path: str | os.PathLike[str], *, external: bool | None = None) -> Path:
    """Write ``model`` to ``path`` atomically; with external data in ``NAME.data`` beside it when
    ``external`` (default: when the model came with external data or its tensors pass :data:`INLINE_LIMIT`).

    Both files are written in a hidden staging folder beside the target, then renamed into place, data
    first: the pair is never half-written, and a model being rewritten onto itself keeps reading its old
    data (the rename gives the new data a new inode).
    """
    import onnx_ir as ir

    target = Path(path)
    if target.is_dir():
        raise OnnxLoadError(f"output path {target} is a directory; expected a file path")
    if external is None:
        external = is_external(model) or tensor_bytes(model) >= inline_limit()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        staged = staging / target.name
        data_name = data_file_name(target)
        if external:
            ir.save(model, staged, external_data=data_name, size_threshold_bytes=SIZE_THRESHOLD)
        else:
            ir.save(model, staged)
        _publish(staging, target, data_name if (staging / data_name).exists() else None)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def save_proto(model: onnx.ModelProto, path: str | os.PathLike[str], *, external: bool | None = None) -> Path:
    """Write a proto atomically, like :func:`save_ir` (external data when asked, or past the limit).

    With external data the proto is wrapped in onnx-ir (which references its tensors, no copy) and
    streamed out tensor by tensor; ``model`` itself is never modified.
    """
    import onnx_ir as ir

    target = Path(path)
    if has_external_data(model):
        raise OnnxLoadError("save_proto got a model whose external data is not loaded; use save_ir")
    if external is None:
        external = model.ByteSize() >= inline_limit()
    if external:
        return save_ir(ir.serde.deserialize_model(model), target, external=True)
    if target.is_dir():
        raise OnnxLoadError(f"output path {target} is a directory; expected a file path")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        (staging / target.name).write_bytes(model.SerializeToString())
        _publish(staging, target, None)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _publish(staging: Path, target: Path, data_name: str | None) -> None:
    """Rename the staged data file (if any), then the model, onto their targets."""
    umask = os.umask(0)
    os.umask(umask)
    for name in (data_name, target.name):
        if name is None:
            continue
        os.chmod(staging / name, 0o666 & ~umask)  # staged files get the usual permissions
        os.replace(staging / name, target.parent / name)
    stale = target.parent / data_file_name(target)
    if data_name is None and stale.is_file():
        logger.info("%s now holds its tensors inline; %s is no longer used by it", target, stale)


def copy_external_data(refs: list[ExternalRef], dest_dir: Path) -> list[str]:
    """Copy each distinct data file of ``refs`` to the same relative location under ``dest_dir``.

    The locations were checked by :func:`resolve_external_data`, so each destination stays inside
    ``dest_dir``; returns the copied locations.
    """
    copied: list[str] = []
    root = dest_dir.resolve()
    for ref in refs:
        if ref.location in copied:
            continue
        dst = root.joinpath(*location_parts(ref.location))
        if not dst.resolve().is_relative_to(root):  # a symlinked folder already inside dest_dir
            raise _refuse(ref.tensor, ref.location, "would be written outside the destination")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ref.path, dst)
        copied.append(ref.location)
    return copied


def model_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 over the model file and every external-data file it uses (in location order): a cache key
    that changes when only the weights in ``NAME.data`` do."""
    import hashlib

    digest = hashlib.sha256()
    files = [Path(path), *sorted({ref.path for ref in resolve_external_data(read_graph(path), path)})]
    for file in files:
        with open(file, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def uses_external_data(src: str | os.PathLike[str] | onnx.ModelProto) -> bool:
    """Whether a model file (or proto) keeps tensors in external data: its rewrites should too."""
    return has_external_data(src if isinstance(src, onnx.ModelProto) else read_graph(src))
