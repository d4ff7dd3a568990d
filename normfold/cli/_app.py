"""The typer app, the global ``--verbose`` flag, and the error → exit-code mapping.

Commands stay thin: parse arguments, call one library function, render its report. Whatever ends a
command early prints one line ``error: ...`` on stderr (a traceback only with ``--verbose``) and exits
with one code:

* :class:`~normfold.errors.NormfoldError`: its own code (2 bad input, 3 unavailable backend).
* click's argument errors (``--opset abc``, ``--jobs 0``): 2, one line instead of a Usage box.
* ``OSError`` from the file system (read-only folder, a file where a folder is needed): 2.
* ``SystemExit`` from user model code that slipped past :func:`normfold.models.guard.user_code`: 2.
* Ctrl-C: 130; SIGTERM: 143 (see :mod:`normfold.cli._signals`), whatever the exception that carried it.
* anything else: 1, ``internal error``.

With ``--json`` on stdout, stdout carries exactly one JSON object: the report, or ``{"error", "exit_code"}``;
everything else printed while the command runs (ours, or a third-party library's) goes to stderr.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any, ClassVar, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from typer._click.exceptions import NoArgsIsHelpError  # typer vendors click; no public name for it
from typer.core import TyperGroup

from normfold.cli import _signals
from normfold.errors import NormfoldError

F = TypeVar("F", bound=Callable[..., Any])


class _Group(TyperGroup):
    """Argument errors as one ``error:`` line and exit 2 (click would print a Usage box)."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else EXIT_OK
        except NoArgsIsHelpError as e:
            typer.echo(e.format_message())
            code = EXIT_OK
        except typer.TyperException as e:  # click's UsageError, BadParameter, NoSuchOption…
            ctx = getattr(e, "ctx", None)
            hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            _error_line(f"{e.format_message()}{hint}")
            code = EXIT_USAGE if ctx is not None else e.exit_code
        except typer.Abort:
            _error_line("interrupted")
            code = _signals.received() or _signals.EXIT_INTERRUPTED
        if code == _signals.EXIT_INTERRUPTED:
            code = _signals.received() or code
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    name="normfold",
    cls=_Group,
    help="Take trained PyTorch models to production inference and prove nothing was lost.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

state: dict[str, Any] = {"verbose": False, "json": None}
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3
#: Width of tables written to a pipe or a CI log: rich's default of 80 columns would cut numbers.
PIPE_WIDTH = 400


def _fit_consoles() -> None:
    """A terminal keeps its width; a pipe or file gets :data:`PIPE_WIDTH`, even where CI sets COLUMNS=80."""
    for console in (out, err):
        console.width = None  # type: ignore[assignment]  # re-detect: CliRunner swaps the streams
        if not console.is_terminal:
            console.width = PIPE_WIDTH


def _error_line(message: str) -> None:
    err.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)


def setup_logging(verbose: bool) -> None:
    """Logging is configured here only: the library just calls ``logging.getLogger(__name__)``."""
    teardown_logging()
    root = logging.getLogger()
    handler = RichHandler(console=err, show_path=False, show_time=False, markup=False)
    root.addHandler(handler)
    _handlers.append(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    quiet_third_party(verbose)


#: Loggers of third-party libraries that warn about things a user cannot act on (torch.onnx: missing
#: torchvision ops, opset notes); at ERROR unless ``--verbose``.
_NOISY_LOGGERS = (
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
)


def quiet_third_party(verbose: bool = False) -> None:
    """Set the noisy loggers' levels now, and again right after ``import torch`` if torch is not loaded yet.

    ``import torch`` resets its registered loggers (``torch``, ``torch.onnx``) to WARNING with handlers of its
    own, so a level set before it is lost. Importing torch here only to override it cost every command,
    ``normfold backends`` included, seconds of start-up; the import hook defers the override to the commands
    that load torch anyway.
    """
    level = logging.DEBUG if verbose else logging.ERROR

    def apply() -> None:
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).setLevel(level)

    apply()
    if "torch" not in sys.modules:
        _AfterImport.arm("torch", apply)
    # Polygraphy prints to stdout unless told to use Python logging: keep --json output clean.
    from normfold.runtime.probe import route_polygraphy_logging

    route_polygraphy_logging()


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls ``callback`` once module ``name`` has finished executing (one armed hook per module name)."""

    _armed: ClassVar[dict[str, _AfterImport]] = {}

    def __init__(self, name: str, callback: Callable[[], None]) -> None:
        self.name = name
        self.callback = callback

    @classmethod
    def arm(cls, name: str, callback: Callable[[], None]) -> None:
        """Install the hook, or retarget the armed one (the latest ``--verbose`` choice wins)."""
        hook = cls._armed.get(name)
        if hook is None:
            hook = cls._armed[name] = cls(name, callback)
            sys.meta_path.insert(0, hook)
        hook.callback = callback

    def _disarm(self) -> None:
        self._armed.pop(self.name, None)
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: Any = None) -> ModuleSpec | None:
        if fullname != self.name:
            return None
        self._disarm()  # before find_spec below, which would otherwise find this hook again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader, callback = spec.loader, self.callback
        run = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            callback()

        # Wrap this one loader instance (not a new loader type: torch reads package resources through it).
        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


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
    _fit_consoles()
    setup_logging(verbose)
    ctx.call_on_close(teardown_logging)


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    """Print ``error: message`` on stderr (and the JSON error object in ``--json`` mode); the Exit to raise."""
    _error_line(message)
    if state["json"] is not None:
        state["json"] = {"error": message, "exit_code": code}
    return typer.Exit(code)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _os_error_message(e: OSError) -> str:
    """``cannot write out/m.onnx: Read-only file system`` from an OSError's parts."""
    reason = e.strerror or _first_line(e) or type(e).__name__
    where = e.filename if e.filename is not None else ""
    return f"{reason}: {where}" if where else reason


def _failure(e: BaseException) -> typer.Exit:
    """Map whatever ended a command to its one-line error and exit code (see the module docstring)."""
    signal_code = _signals.received()
    if isinstance(e, KeyboardInterrupt) or signal_code is not None:
        return fail(
            "terminated (SIGTERM)" if _signals.interrupt_code(e) == 143 else "interrupted", _signals.interrupt_code(e)
        )
    if state["verbose"]:
        err.print_exception()
    if isinstance(e, NormfoldError):
        return fail(str(e).replace("\n", " "), e.exit_code)
    if isinstance(e, SystemExit):
        from normfold.models.guard import describe_escape

        return fail(f"model code {describe_escape(e)}", EXIT_USAGE)
    if isinstance(e, OSError):
        return fail(_os_error_message(e), EXIT_USAGE)
    if isinstance(e, Exception):
        return fail(f"internal error: {type(e).__name__}: {_first_line(e)} (rerun with --verbose)", 1)
    return fail(f"internal error: {type(e).__name__} (rerun with --verbose)", 1)


def _json_mode(kwargs: dict[str, Any]) -> bool:
    """Whether this call puts JSON on stdout (``--json`` flag, or ``--json -``)."""
    return kwargs.get("as_json") is True or any(str(kwargs.get(k)) == "-" for k in ("json_out", "json_path"))


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout, by Python or by native code on fd 1, to stderr meanwhile."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stdout(sys.stderr))
        try:
            fd = sys.__stdout__.fileno() if sys.__stdout__ is not None else -1
            sys.__stdout__.flush()  # type: ignore[union-attr]
        except (AttributeError, OSError, ValueError):
            fd = -1
        if fd == 1:
            saved = os.dup(1)
            os.dup2(2, 1)

            def restore() -> None:
                with contextlib.suppress(OSError, ValueError):
                    sys.__stdout__.flush()  # type: ignore[union-attr]
                os.dup2(saved, 1)
                os.close(saved)

            stack.callback(restore)
        yield


def command(*args: Any, **kwargs: Any) -> Callable[[F], F]:
    """``app.command`` plus the error mapping every normfold command shares."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def run(*a: Any, **k: Any) -> Any:
            as_json = _json_mode(k)
            state["json"] = {} if as_json else None
            try:
                with _stdout_to_stderr() if as_json else contextlib.nullcontext():
                    return fn(*a, **k)
            except typer.Exit:
                raise
            except BaseException as e:  # every way out is mapped to one line and a code
                raise _failure(e) from None
            finally:
                payload, state["json"] = state["json"], None
                if payload:
                    _write_stdout(payload)

        app.command(*args, **kwargs)(run)
        return fn

    return wrap


def csv(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def emit_json(payload: Any) -> None:
    """Put ``payload`` on stdout as the command's one JSON object (written when the command ends)."""
    if state["json"] is not None:
        state["json"] = payload
        return
    _write_stdout(payload)


def _write_stdout(payload: Any) -> None:
    from normfold.io import json_text

    sys.stdout.write(json_text(payload))
    sys.stdout.flush()
