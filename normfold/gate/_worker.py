"""Entry point of a process-executor worker: ``python -m normfold.gate._worker FD PARENT_PID``.

The first thing a worker does is tie its life to the gate's: on Linux ``prctl(PR_SET_PDEATHSIG,
SIGTERM)`` has the kernel signal it the moment its parent dies, whatever killed the parent (SIGKILL
included, which no handler sees). SIGTERM unwinds the case (its temporary folder is removed) and a
timer ends the process :data:`TERM_GRACE_S` later if native code does not return. If the parent is
already gone by then, the worker exits at once.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from types import FrameType

PR_SET_PDEATHSIG = 1
TERM_GRACE_S = 2.0


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent exits (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no prctl: the socket's EOF and the per-case deadline still end the worker
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Unwind the running case (cleanup), but never linger past the grace period."""
    timer = threading.Timer(TERM_GRACE_S, os._exit, args=(128 + signum,))
    timer.daemon = True
    timer.start()
    from normfold.errors import Terminated

    raise Terminated()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the gate owns Ctrl-C and stops its workers itself
    die_with_parent(int(sys.argv[2]) if len(sys.argv) > 2 else os.getppid())
    from normfold.gate.executors import worker_main

    worker_main(int(sys.argv[1]))
