"""Shared fixtures and the GPU skip rule."""

from __future__ import annotations

import pytest
import torch.onnx  # noqa: F401  (bind torch's log handlers to the real stderr before CliRunner swaps it)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` tests with the exact reason the GPU stack cannot run here (never counted as passed)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    from normfold.runtime.probe import gpu_reason

    reason = gpu_reason()
    if reason is None:
        return
    for item in gpu_items:
        item.add_marker(pytest.mark.skip(reason=f"gpu test: {reason}"))
