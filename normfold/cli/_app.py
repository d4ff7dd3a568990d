"""The typer app, the global ``--verbose`` flag, and the error → exit-code mapping.

Commands stay thin: parse arguments, call one library function, render its report. Errors derived
from :class:`~normfold.errors.NormfoldError` print one line ``error: ...`` on stderr and exit with the
error's code (2 bad input, 3 unavailable backend); a traceback appears only with ``--verbose``.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler

from normfold.errors import NormfoldError

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="normfold",
    help="Take trained PyTorch models to production inference and prove nothing was lost.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

state: dict[str, Any] = {"verbose": False}
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3


def setup_logging(verbose: bool) -> None:
    """Logging is configured here only: the library just calls ``logging.getLogger(__name__)``."""
    teardown_logging()
    root = logging.getLogger()
    handler = RichHandler(console=err, show_path=False, show_time=False, markup=False)
    root.addHandler(handler)
    _handlers.append(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    quiet_third_party(verbose)


def quiet_third_party(verbose: bool = False) -> None:
    """torch.onnx logs warnings (missing torchvision ops, opset notes) through its own handlers."""
    import torch.onnx  # noqa: F401  (its import configures torch's loggers; override after it)

    level = logging.DEBUG if verbose else logging.ERROR
    for noisy in (
        "torch",
        "torch.onnx",
        "torch.onnx._internal.exporter._registration",
        "torch.onnx._internal.exporter._compat",
        "onnxscript",
        "onnx_ir",
        "matplotlib",
        "PIL",
        "ray",
        "Polygraphy",
    ):
        logging.getLogger(noisy).setLevel(level)
    # Polygraphy prints to stdout unless told to use Python logging: keep --json output clean.
    from normfold.runtime.probe import route_polygraphy_logging

    route_polygraphy_logging()


_handlers: list[logging.Handler] = []


def teardown_logging() -> None:
    """Detach our handler when the command ends (CliRunner closes the stream it wrote to)."""
    root = logging.getLogger()
    while _handlers:
        root.removeHandler(_handlers.pop())
        quiet_third_party(False)
    root.setLevel(logging.WARNING)


@app.callback()
def _root(
    ctx: typer.Context,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging and full tracebacks on errors."),
) -> None:
    state["verbose"] = verbose
    setup_logging(verbose)
    ctx.call_on_close(teardown_logging)


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    """Print ``error: message`` on stderr and return the Exit to raise."""
    err.print(f"error: {message}", markup=False, highlight=False)
    return typer.Exit(code)


def command(*args: Any, **kwargs: Any) -> Callable[[F], F]:
    """``app.command`` plus the error mapping every normfold command shares."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def run(*a: Any, **k: Any) -> Any:
            try:
                return fn(*a, **k)
            except typer.Exit:
                raise
            except NormfoldError as e:
                if state["verbose"]:
                    err.print_exception()
                raise fail(str(e).replace("\n", " "), e.exit_code) from None
            except KeyboardInterrupt:
                raise fail("interrupted", 130) from None
            except Exception as e:
                if state["verbose"]:
                    err.print_exception()
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise fail(f"internal error: {type(e).__name__}: {first} (rerun with --verbose)", 1) from None

        app.command(*args, **kwargs)(run)
        return fn

    return wrap


def csv(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def emit_json(payload: Any) -> None:
    from normfold.io import json_text

    sys.stdout.write(json_text(payload))
    sys.stdout.flush()
