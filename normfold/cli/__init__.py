"""The ``normfold`` command line (typer). Each module registers its commands on the shared app."""

from __future__ import annotations

from normfold.cli import bench as _bench  # noqa: F401  (registers bench)
from normfold.cli import commands as _commands  # noqa: F401  (backends, zoo, export, run, compare)
from normfold.cli import convert as _convert  # noqa: F401  (registers convert)
from normfold.cli import gate as _gate  # noqa: F401  (registers gate and demo)
from normfold.cli import optimize as _optimize  # noqa: F401  (registers `normfold optimize`)
from normfold.cli import triton as _triton  # noqa: F401  (registers `normfold triton`)
from normfold.cli._app import app


def main() -> None:
    """Console-script entry point: SIGINT and SIGTERM unwind (cleanup runs) and exit 130 / 143."""
    from normfold.cli import _signals

    _signals.install()
    app()


__all__ = ["app", "main"]
