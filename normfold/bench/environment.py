"""The ``environment`` block of a bench report: what machine and software produced the numbers.

Latency numbers are meaningless without the CPU, the core count, the library versions and the thread
settings they were measured with; a baseline from another machine is flagged by the regression check.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ORT_NUM_THREADS")


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's marketing name from ``/proc/cpuinfo`` (``model name``), else :func:`platform.processor`."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        log.debug("cannot read %s: %s", cpuinfo, e)
        text = ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("model name", "Model", "Hardware", "cpu model") and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def library_versions() -> dict[str, str | None]:
    """Versions of the packages that decide the numbers (None when not installed)."""
    import normfold

    ort_version: str | None
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    try:
        import torch

        torch_version: str | None = torch.__version__
    except ImportError:
        torch_version = None
    return {
        "normfold": normfold.__version__,
        "torch": torch_version,
        "onnxruntime": ort_version,
        "onnx": _version("onnx"),
        "numpy": _version("numpy"),
    }


def ort_providers() -> list[str]:
    """Providers this onnxruntime build lists (listed is not the same as usable: see ``normfold backends``)."""
    try:
        import onnxruntime

        return list(onnxruntime.get_available_providers())
    except ImportError:
        return []


def collect_environment(threads: dict[str, Any]) -> dict[str, Any]:
    """CPU model, cores, versions, providers, GPU (if any) and the ``threads`` settings used."""
    from normfold.runtime.probe import gpu_name, gpu_reason

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 0
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "machine": platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": library_versions(),
        "providers": ort_providers(),
        "gpu": gpu_name() if gpu_reason() is None else None,
        "threads": dict(threads),
        "thread_env": {k: os.environ[k] for k in _THREAD_ENV_VARS if k in os.environ},
    }
