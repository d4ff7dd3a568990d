"""Files in and out: atomic writes and ONNX loading with clear errors.

Every file normfold produces is written to a temporary file in the target directory and then renamed
into place with :func:`os.replace`, so an interrupted run never leaves a half-written model or report.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import onnx

from normfold.errors import OutputPathError, UsageError


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _existing_ancestor(path: Path) -> Path:
    """The nearest part of ``path`` (itself included) that exists; relative paths end at the cwd."""
    current = path
    while not current.exists() and current.parent != current:
        current = current.parent
    return current


def _probe_writable(directory: Path, shown: Path) -> None:
    """Create and delete a temporary file in ``directory``: the only test that root, ACLs and read-only
    mounts all answer truthfully (``os.access`` says yes to root on a read-only mount)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".normfold-probe.", suffix=".tmp", dir=directory)
    except OSError as e:
        raise OutputPathError(f"cannot write {shown}: {e.strerror or e} ({directory})") from None
    os.close(fd)
    os.unlink(name)


def check_output(
    path: str | Path | None, *, inputs: Sequence[str | Path | None] = (), kind: str = "file", flag: str = ""
) -> None:
    """Refuse an output destination before any work is done, with one line naming it.

    ``kind="file"``: not a directory, its folder writable (or creatable). ``kind="dir"``: not a file, and
    writable (or creatable). Never one of ``inputs``: ``run m.onnx -o m.onnx`` would destroy the model.
    """
    if path is None:
        return
    target = Path(path)
    shown = f"{flag} {target}".strip()
    for source in inputs:
        if source is not None and _same_file(target, Path(source)):
            raise OutputPathError(f"{shown} is also an input of this command; writing it would destroy the input")
    if kind == "dir":
        if target.exists() and not target.is_dir():
            raise OutputPathError(f"{shown} is an existing file; expected a directory (or a path to create)")
    elif target.is_dir():
        raise OutputPathError(f"{shown} is a directory; expected a file path")
    folder = target if kind == "dir" and target.exists() else target.parent
    ancestor = _existing_ancestor(folder)
    if not ancestor.is_dir():
        raise OutputPathError(f"cannot write {shown}: {ancestor} is a file, not a directory")
    _probe_writable(ancestor, target)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, on error delete it.

    The temporary file is removed on any way out, including ``KeyboardInterrupt`` and SIGTERM (the CLI
    turns it into :class:`~normfold.errors.Terminated`); file-system refusals are one-line
    :class:`OutputPathError` s.
    """
    target = Path(path)
    if target.exists() and target.is_dir():
        raise UsageError(f"output path {target} is a directory; expected a file path")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as e:
        raise OutputPathError(f"cannot write {target}: {e.strerror or e}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; outputs get the usual permissions
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Like ``open(path, mode)`` for writing, but atomic (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if "b" in mode else "utf-8") as fh:
        yield fh


def write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path, "w") as fh:
        fh.write(text)
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def load_onnx(path: str | Path, *, load_external_data: bool = True) -> onnx.ModelProto:
    """Load and check an ONNX file; a missing, unreadable or invalid file raises :class:`OnnxLoadError`.

    External-data locations are checked first (:mod:`normfold.onnx_files`); with
    ``load_external_data=False`` only the graph is read, which is what a model beyond 2 GiB needs.
    """
    from normfold.onnx_files import load_proto

    return load_proto(path, with_data=load_external_data)


def save_onnx(model: onnx.ModelProto, path: str | Path, *, external: bool | None = None) -> Path:
    """Save ``model`` atomically; external data ``NAME.data`` beside it when ``external`` (default: only
    when it would exceed protobuf's limit)."""
    from normfold.onnx_files import save_proto

    return save_proto(model, path, external=external)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``path``; on success it replaces ``path`` (an existing folder
    is swapped out and removed only then), on error it is deleted and ``path`` is untouched."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield staging
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def jsonable(obj: Any) -> Any:
    """Replace non-finite floats by ``"inf"``/``"-inf"``/``"nan"`` so the JSON is strict (no ``Infinity``)."""
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def json_text(obj: Any) -> str:
    """Strict, indented JSON of a report's ``to_dict()``; every JSON normfold writes goes through here."""
    return json.dumps(jsonable(obj), indent=2, allow_nan=False, default=str) + "\n"


def load_npz(path: str | Path) -> dict[str, Any]:
    """The arrays of an ``.npz`` inputs file (never unpickled); a missing or unreadable file is an
    :class:`~normfold.errors.InputSpecError`. The one ``.npz`` reader: run, compare and the model loader use it."""
    import zipfile

    import numpy as np

    from normfold.errors import InputSpecError

    p = Path(path)
    if not p.is_file():
        raise InputSpecError(f"inputs file not found: {p}")
    try:
        with np.load(p, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise InputSpecError(f"cannot read inputs file {p} as .npz: {type(e).__name__}: {e}") from e
