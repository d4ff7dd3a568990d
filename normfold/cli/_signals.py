"""SIGINT and SIGTERM end a command the same way: an exception in the main thread, then exit 130 or 143.

Python turns SIGINT into ``KeyboardInterrupt``, but SIGTERM (what ``kill``, CI runners and container
runtimes send) kills the interpreter without unwinding: no ``finally`` runs, so atomic writers leave
their hidden ``.NAME.XXXX.tmp`` and ``TemporaryDirectory`` leaves its folder. Here SIGTERM raises
:class:`~normfold.errors.Terminated` (a ``KeyboardInterrupt``), so both signals unwind through every
``finally``. Each signal is also recorded: third-party code sometimes swallows the interrupt and fails
with something else (torch's exporter reports an interrupted import as ``AttributeError``), and the CLI
still reports the signal, never "bad input". A second signal while unwinding is recorded, not raised, so
cleanup is not cut short; a third ends the process at once.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

from normfold.errors import Terminated

EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM

_received: list[int] = []
_HARD_EXIT_AFTER = 3  # a third signal ends the process at once (cleanup stuck in native code)


def _handler(signum: int, frame: FrameType | None) -> None:
    first = not _received
    _received.append(signum)
    if len(_received) >= _HARD_EXIT_AFTER:
        os._exit(received() or EXIT_INTERRUPTED)  # the user insists: stop now, even mid-cleanup
    if not first:
        return  # already unwinding: let the cleanup finish
    if signum == signal.SIGTERM:
        raise Terminated()
    raise KeyboardInterrupt()


def install() -> None:
    """Route SIGINT and SIGTERM through :func:`_handler` (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        return
    _received.clear()
    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)


def received() -> int | None:
    """The exit code a signal received so far calls for (143 SIGTERM, 130 SIGINT), else None."""
    if not _received:
        return None
    return EXIT_TERMINATED if _received[0] == signal.SIGTERM else EXIT_INTERRUPTED


def interrupt_code(e: BaseException) -> int:
    """Exit code for an interrupt exception: 143 for SIGTERM, 130 for Ctrl-C."""
    return EXIT_TERMINATED if isinstance(e, Terminated) or received() == EXIT_TERMINATED else EXIT_INTERRUPTED
