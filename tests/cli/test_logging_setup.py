"""The CLI quiets torch.onnx's loggers without importing torch itself: a command that never touches torch
starts in well under a second, and a command that does still gets torch's loggers at ERROR (torch resets
them when it is imported, so the levels are applied again right after that import)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_SCRIPT = textwrap.dedent(
    """
    import logging, sys
    from normfold.cli import app
    code = app(["triton", "--help"], standalone_mode=False)
    assert code in (0, None), code
    assert "torch" not in sys.modules, "a command without torch imported torch"
    from normfold.cli._app import setup_logging
    setup_logging(False)  # what the root callback does for the next command, torch still not loaded
    import torch.onnx  # resets torch's registered loggers to WARNING
    for name in ("torch", "torch.onnx", "torch.onnx._internal.exporter._registration"):
        assert logging.getLogger(name).getEffectiveLevel() == logging.ERROR, (name, logging.getLogger(name).level)
    print("ok")
    """
)


def test_commands_without_torch_do_not_import_it_and_torch_loggers_stay_quiet() -> None:
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")
