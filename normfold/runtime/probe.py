"""Availability probes: can a backend really run here, and if not, exactly why.

Reading ``onnxruntime.get_available_providers()`` is not enough: onnxruntime-gpu lists the CUDA and
TensorRT providers even where their shared libraries cannot load, and then silently falls back to the
CPU. The probes therefore create a real session on a one-node model and check the providers it got,
capturing the C++ loader's stderr so the reason names the missing library.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import io
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

_ANSI = re.compile(r"\x1b\[[0-9;]*m")

INSTALL_HINT = "pip install 'normfold[tensorrt]'"
ORT_CUDA_PIP_SUFFIX = "cu13"
"""onnxruntime-gpu 1.31.1's providers link CUDA 13 (``libcudart.so.13``, ``libcublas.so.13``) and cuDNN 9;
its TensorRT EP links ``libnvinfer.so.10``: the matching wheels are ``tensorrt-cu13`` 10.x."""


@contextlib.contextmanager
def capture_native_stderr() -> Iterator[list[str]]:
    """Redirect file descriptor 2 (where ORT's C++ logger writes) into a list of lines."""
    lines: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = _ANSI.sub("", tmp.read().decode("utf-8", "replace"))
            lines.extend(line.strip() for line in text.splitlines() if line.strip())


@functools.cache
def gpu_reason() -> str | None:
    """None when an NVIDIA GPU is visible to this process, else why not."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return "no NVIDIA GPU visible (CUDA_VISIBLE_DEVICES hides all devices)"
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"no NVIDIA GPU visible (nvidia-smi failed: {e})"
        if out.returncode == 0 and "GPU" in out.stdout:
            return None
        return f"no NVIDIA GPU visible (nvidia-smi -L: {(out.stderr or out.stdout).strip()[:200]})"
    if any(Path("/dev").glob("nvidia[0-9]*")):
        return None
    return "no NVIDIA GPU visible (no /dev/nvidia* device and no nvidia-smi)"


def gpu_name() -> str | None:
    """The first GPU's name from nvidia-smi, if any (used in engine cache keys)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = out.stdout.strip().splitlines()
    return names[0].strip() if out.returncode == 0 and names else None


def _identity_model_bytes() -> bytes:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _loader_message(lines: list[str]) -> str:
    """The most specific line of ORT's native log: the failed library load, else the first error."""
    for key in ("cannot open shared object", "Failed to load library", "Failed to create", "EP Error"):
        for line in lines:
            if key in line:
                msg = line
                if "with error:" in msg:
                    msg = msg.split("with error:", 1)[1].strip()
                return msg[:300]
    return lines[0][:300] if lines else "no message from the loader"


@functools.cache
def ort_provider_reason(provider: str) -> str | None:
    """None when a real ORT session gets ``provider``; else the exact reason."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        return f"onnxruntime not importable: {e}"
    listed = ort.get_available_providers()
    if provider not in listed:
        return f"this onnxruntime build ({ort.__version__}) does not include {provider} (has: {', '.join(listed)})"
    if provider == "CPUExecutionProvider":
        return None
    no_gpu = gpu_reason()
    with capture_native_stderr() as lines, contextlib.redirect_stdout(io.StringIO()):
        try:
            sess = ort.InferenceSession(_identity_model_bytes(), providers=[provider, "CPUExecutionProvider"])
            got = sess.get_providers()
            error: str | None = None
        except Exception as e:
            got, error = [], f"{type(e).__name__}: {e}"
    if error is None and provider in got:
        return None
    detail = error or _loader_message(lines)
    prefix = f"{no_gpu}; " if no_gpu else ""
    hint = nvinfer_hint(detail, installed_version("tensorrt"))
    return f"{prefix}onnxruntime lists {provider} but creating a session with it failed: {detail}{hint}"


def installed_version(dist: str) -> str | None:
    """The installed version of a distribution, or None (never imports it)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def nvinfer_hint(message: str, tensorrt_version: str | None) -> str:
    """When the loader could not open ``libnvinfer.so.N``: which TensorRT the EP wants and what is installed.

    ``pip install tensorrt`` alone gives 11.x, whose ``libnvinfer.so.11`` the EP (linked against
    ``.so.10``) does not load: say so instead of leaving a bare dlopen error.
    """
    found = re.search(r"libnvinfer\S*\.so\.(\d+)", message)
    if not found:
        return ""
    want = found.group(1)
    have = f"installed tensorrt is {tensorrt_version}" if tensorrt_version else "tensorrt is not installed"
    fix = f"pip install 'tensorrt-{ORT_CUDA_PIP_SUFFIX}=={want}.*'"
    return f" (the TensorRT EP needs TensorRT {want}.x, libnvinfer.so.{want}; {have}: {fix})"


def route_polygraphy_logging() -> None:
    """Polygraphy prints its log (and a "colored module is not installed" note) to stdout, which would
    corrupt ``--json`` output: send it through Python logging (logger ``"Polygraphy"``) instead."""
    if importlib.util.find_spec("polygraphy") is None:
        return
    from polygraphy.logger import G_LOGGER

    G_LOGGER.colors = False  # its colour check prints to stdout when `colored` is missing
    G_LOGGER.use_python_logging_system = True
    logging.getLogger("Polygraphy").propagate = True


def cudart_reason() -> str | None:
    """None when Polygraphy can load the CUDA runtime it calls at activation (``libcudart.so*``)."""
    route_polygraphy_logging()
    try:
        from polygraphy import cuda

        cuda.wrapper()
    except Exception as e:  # OSError from ctypes.CDLL, or Polygraphy's own error
        return (
            f"Polygraphy cannot load the CUDA runtime (libcudart.so*): {type(e).__name__}: {e}; "
            "pip install nvidia-cuda-runtime (CUDA 13) or put libcudart.so* on LD_LIBRARY_PATH"
        )
    return None


def tensorrt_reason() -> str | None:
    """None when tensorrt and polygraphy import, libcudart loads and a GPU is visible; else exactly why."""
    missing = [m for m in ("tensorrt", "polygraphy") if importlib.util.find_spec(m) is None]
    no_gpu = gpu_reason()
    if missing:
        why = f"{' and '.join(missing)} not installed ({INSTALL_HINT})"
        return f"{no_gpu}; {why}" if no_gpu else why
    if no_gpu:
        return no_gpu
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # a broken install raises ImportError or OSError from the loader
        version = installed_version("tensorrt")
        return f"tensorrt {version} is installed but failed to import: {type(e).__name__}: {e}"
    return cudart_reason()
