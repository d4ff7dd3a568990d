"""Where cases run: in this process, in worker processes, or as Ray tasks. Same verdicts from each.

* ``local`` runs cases one after another in this process. Cheapest; a case that crashes the
  interpreter takes the gate down with it and timeouts are not enforced, so CI should use ``process``.
* ``process`` keeps up to ``jobs`` worker subprocesses (fresh interpreters; never fork, since torch and
  ORT hold threads). A watchdog in the parent waits on every worker's socket at once: a case past its
  ``timeout_s`` gets its worker killed, and a worker that dies mid-case (segfault in a runtime, the OOM
  killer) closes its socket, which turns into that case's ``error`` with the signal named. A fresh worker
  replaces it; the gate itself never dies or hangs. Workers cannot outlive the gate: each asks the
  kernel to kill it when its parent dies (``PR_SET_PDEATHSIG``, see :mod:`normfold.gate._worker`), runs
  in its own session (a terminal's Ctrl-C reaches the gate, which stops them), and enforces each case's
  deadline itself too (``timeout_s`` plus a grace period), so a timeout holds even when the parent is
  stopped or too busy to enforce it.
* ``ray`` submits each case as a Ray task (``ray.init(address=...)``, or a local Ray with ``jobs`` CPUs).
  At most ``jobs`` tasks are in flight so that each task's timeout counts from its own start; a task past
  its timeout is cancelled with ``force=True`` (its worker process is killed), and a crashed worker is
  that case's error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from normfold.errors import ConfigError, UsageError
from normfold.gate.cases import CaseResult, CaseSpec, run_case

log = logging.getLogger(__name__)

OnStart = Callable[[CaseSpec], None]
OnDone = Callable[[CaseResult], None]

_KILL_GRACE_S = 5.0
_TERM_GRACE_S = 2.0  # a killed worker's case gets this long to unwind before SIGKILL
_STOP_GRACE_S = 2.0  # idle workers hold no state: a slow interpreter shutdown is cut short
WORKER_TIMEOUT_EXIT = 124  # a worker that ended itself at its case's deadline


def _noop_start(spec: CaseSpec) -> None:
    return None


def _noop_done(result: CaseResult) -> None:
    return None


def _infra_failure(spec: CaseSpec, reason: str, stage: str, started: float) -> CaseResult:
    result = CaseResult(
        spec.case_id, spec.model, spec.backend, spec.precision, status="error", reason=reason, stage=stage
    )
    result.duration_s = time.perf_counter() - started
    return result


def describe_exit(exitcode: int | None) -> str:
    """A worker's exit code in words: negative codes are the signal that killed it."""
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = {
            "SIGSEGV": " (segmentation fault inside a native library)",
            "SIGKILL": " (killed; often the out-of-memory killer)",
            "SIGABRT": " (aborted by a native library)",
            "SIGBUS": " (bus error inside a native library)",
        }.get(name, "")
        return f"killed by {name}{hint}"
    return f"exited with code {exitcode}"


# --------------------------------------------------------------------------------------------------------
# local


def run_local(
    specs: Sequence[CaseSpec], on_start: OnStart = _noop_start, on_done: OnDone = _noop_done
) -> list[CaseResult]:
    """Every case in this process, in order (no isolation, no timeout)."""
    results = []
    for spec in specs:
        on_start(spec)
        result = run_case(spec)
        on_done(result)
        results.append(result)
    return results


# --------------------------------------------------------------------------------------------------------
# process


class _SelfDeadline:
    """Ends this worker if its case outlives ``timeout_s`` plus the parent's kill grace, parent or not.

    It sends this process SIGTERM, so the case unwinds and removes its temporary folder (see
    :mod:`normfold.gate._worker`), and hard-exits :data:`_TERM_GRACE_S` later if native code never returns.
    """

    def __init__(self, spec: CaseSpec) -> None:
        self.spec = spec
        self.expired = False
        self.timer = threading.Timer(spec.timeout_s + _KILL_GRACE_S, self._expire)
        self.timer.daemon = True
        self.timer.start()

    def _expire(self) -> None:
        self.expired = True
        sys.stderr.write(f"normfold worker: case {self.spec.case_id} passed its {self.spec.timeout_s:g} s timeout\n")
        sys.stderr.flush()
        hard = threading.Timer(_TERM_GRACE_S, os._exit, args=(WORKER_TIMEOUT_EXIT,))
        hard.daemon = True
        hard.start()
        os.kill(os.getpid(), signal.SIGTERM)

    def cancel(self) -> None:
        self.timer.cancel()


def worker_main(fd: int) -> None:
    """Worker loop over the socket ``fd``: receive a spec, send back its result; ``None`` ends the loop."""
    import faulthandler
    import warnings

    # A segfault in a native runtime prints the Python frames that called it (the crashing thread only:
    # the deadline timer thread would come first and push them out of the tail).
    faulthandler.enable(all_threads=False)
    import torch.onnx  # noqa: F401  (its import configures torch's loggers; quiet them after it)

    warnings.simplefilter("ignore")
    for name in ["", *logging.root.manager.loggerDict]:
        if name in ("", "onnxscript", "onnx_ir") or name.startswith("torch"):
            logging.getLogger(name).setLevel(logging.ERROR)
    conn = Connection(fd)
    while True:
        try:
            spec = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            return
        if spec is None:
            return
        deadline = _SelfDeadline(spec)
        try:
            result = run_case(spec)
        except KeyboardInterrupt:  # SIGTERM: from the gate, the kernel (parent died) or our own deadline
            raise SystemExit(WORKER_TIMEOUT_EXIT if deadline.expired else 143) from None
        finally:
            deadline.cancel()
        conn.send(result)


def _child_env() -> dict[str, str]:
    """The worker imports what this process imports: this normfold and every user module on sys.path."""
    env = dict(os.environ)
    paths = [_package_root(), *(p or os.getcwd() for p in sys.path)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    return env


class _Worker:
    """A ``python -m normfold.gate._worker`` subprocess talking over a socket pair.

    A plain subprocess, not ``multiprocessing``: spawn would re-import the caller's ``__main__`` (an
    unguarded script would run again in every worker), and fork is unsafe once torch and ORT hold threads.
    When the worker dies, its end of the socket closes, so the parent sees EOF and reads the exit status.
    """

    def __init__(self, env: dict[str, str]) -> None:
        parent, child = socket.socketpair()
        # The worker's own output (native runtimes print to fd 1/2) would garble the progress display;
        # it goes to a file whose tail explains a crash.
        self.log = tempfile.TemporaryFile()  # noqa: SIM115  (lives as long as the worker; closed by kill/reap)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "normfold.gate._worker", str(child.fileno()), str(os.getpid())],
            pass_fds=(child.fileno(),),
            start_new_session=True,  # the gate handles Ctrl-C/SIGTERM and stops its workers itself
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        child.close()
        self.conn = Connection(parent.detach())
        self.spec: CaseSpec | None = None
        self.started = 0.0

    def assign(self, spec: CaseSpec) -> None:
        self.spec, self.started = spec, time.perf_counter()
        self.conn.send(spec)

    def exit_description(self) -> str:
        """How the worker ended, with the last lines it printed (a native crash often says why)."""
        try:
            code = self.process.wait(_KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        text = describe_exit(code)
        tail = self.output_tail()
        return f"{text} (last output: {tail})" if tail else text

    def output_tail(self, lines: int = 3, chars: int = 400) -> str:
        self.log.seek(0, os.SEEK_END)
        size = self.log.tell()
        self.log.seek(max(0, size - 8192))
        text = self.log.read().decode("utf-8", "replace")
        kept = [line.strip() for line in text.splitlines() if line.strip()]
        fatal = next((i for i, line in enumerate(kept) if line.startswith("Fatal Python error")), None)
        # faulthandler prints the innermost frame first: keep the error line and the frames after it.
        kept = kept[fatal : fatal + lines + 1] if fatal is not None else kept[-lines:]
        return " | ".join(kept)[:chars]

    def kill(self) -> None:
        """SIGTERM first (the case unwinds and removes its temporary folder), SIGKILL after a grace."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(_TERM_GRACE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(_KILL_GRACE_S)
        self.conn.close()
        self.log.close()

    def request_stop(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self.conn.send(None)

    def reap(self, deadline: float) -> None:
        """Wait for the exit asked for by :meth:`request_stop` until ``deadline``, then kill."""
        try:
            self.process.wait(max(0.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.conn.close()
        self.log.close()


def run_processes(
    specs: Sequence[CaseSpec], jobs: int, on_start: OnStart = _noop_start, on_done: OnDone = _noop_done
) -> list[CaseResult]:
    """Cases in up to ``jobs`` worker subprocesses, with a per-case timeout and crash isolation."""
    env = _child_env()
    pending = deque(specs)
    results: dict[str, CaseResult] = {}
    idle: list[_Worker] = []
    busy: list[_Worker] = []
    try:
        while pending or busy:
            while pending and len(busy) < jobs:
                worker = idle.pop() if idle else _Worker(env)
                spec = pending.popleft()
                on_start(spec)
                worker.assign(spec)
                busy.append(worker)
            now = time.perf_counter()
            deadline = min(w.started + w.spec.timeout_s for w in busy if w.spec is not None)
            ready = set(wait([w.conn for w in busy], timeout=max(0.0, deadline - now)))
            for worker in list(busy):
                held = worker.spec
                if held is None:  # cannot happen: busy workers always hold a case
                    continue
                spec = held
                result: CaseResult | None = None
                if worker.conn in ready:
                    try:
                        result = worker.conn.recv()
                    except (EOFError, OSError):
                        reason = f"worker process {worker.exit_description()} while running this case"
                        result = _infra_failure(spec, reason, "crash", worker.started)
                        worker.kill()
                    else:
                        idle.append(worker)
                    busy.remove(worker)
                    worker.spec = None
                elif time.perf_counter() - worker.started >= spec.timeout_s:
                    result = _infra_failure(
                        spec, f"timed out after {spec.timeout_s:g} s (worker killed)", "timeout", worker.started
                    )
                    busy.remove(worker)
                    worker.kill()
                if result is not None:
                    results[spec.case_id] = result
                    on_done(result)
    finally:
        for worker in busy:
            worker.kill()
        for worker in idle:
            worker.request_stop()
        deadline = time.perf_counter() + _STOP_GRACE_S
        for worker in idle:
            worker.reap(deadline)
    return [results[s.case_id] for s in specs]


# --------------------------------------------------------------------------------------------------------
# ray


def _package_root() -> str:
    import normfold

    return str(Path(normfold.__file__).resolve().parent.parent)


def run_ray(
    specs: Sequence[CaseSpec],
    jobs: int,
    address: str | None = None,
    on_start: OnStart = _noop_start,
    on_done: OnDone = _noop_done,
) -> list[CaseResult]:
    """Each case as a Ray task on the cluster at ``address`` (a local Ray with ``jobs`` CPUs when None)."""
    try:
        import ray
        from ray.exceptions import GetTimeoutError, RayError, TaskCancelledError
    except ImportError as e:
        raise UsageError("the ray executor needs Ray: pip install 'normfold[ray]'") from e
    started_here = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
        if address:
            kwargs["address"] = address
        else:
            # A local Ray must import this same normfold, not whatever another path would resolve to.
            path = os.pathsep.join(p for p in (_package_root(), os.environ.get("PYTHONPATH", "")) if p)
            kwargs.update(num_cpus=jobs, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError(f"cannot start or reach Ray at {address or 'a local cluster'}: {e}") from e
        started_here = True
    remote = ray.remote(num_cpus=1, max_retries=0)(run_case)
    pending = deque(specs)
    in_flight: dict[Any, tuple[CaseSpec, float]] = {}
    results: dict[str, CaseResult] = {}

    def finish(spec: CaseSpec, result: CaseResult) -> None:
        results[spec.case_id] = result
        on_done(result)

    try:
        while pending or in_flight:
            while pending and len(in_flight) < jobs:
                spec = pending.popleft()
                on_start(spec)
                in_flight[remote.remote(spec)] = (spec, time.perf_counter())
            now = time.perf_counter()
            deadline = min(start + spec.timeout_s for spec, start in in_flight.values())
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=max(0.0, deadline - now))
            for ref in done:
                spec, start = in_flight.pop(ref)
                try:
                    finish(spec, ray.get(ref))
                except (RayError, GetTimeoutError) as e:
                    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    finish(spec, _infra_failure(spec, f"ray task failed: {type(e).__name__}: {first}", "crash", start))
            now = time.perf_counter()
            for ref, (spec, start) in list(in_flight.items()):
                if now - start >= spec.timeout_s:
                    in_flight.pop(ref)
                    try:
                        ray.cancel(ref, force=True)
                    except (RayError, TaskCancelledError) as e:
                        log.debug("cancelling %s: %s", spec.case_id, e)
                    finish(
                        spec,
                        _infra_failure(
                            spec, f"timed out after {spec.timeout_s:g} s (ray task cancelled)", "timeout", start
                        ),
                    )
    finally:
        for ref in in_flight:
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()
    return [results[s.case_id] for s in specs]


def run_cases(
    specs: Sequence[CaseSpec],
    *,
    executor: str = "local",
    jobs: int = 1,
    ray_address: str | None = None,
    on_start: OnStart = _noop_start,
    on_done: OnDone = _noop_done,
) -> list[CaseResult]:
    """Dispatch to the named executor; results come back in the order of ``specs``."""
    if not specs:
        return []
    if executor == "local":
        return run_local(specs, on_start, on_done)
    if executor == "process":
        return run_processes(specs, max(1, jobs), on_start, on_done)
    if executor == "ray":
        return run_ray(specs, max(1, jobs), ray_address, on_start, on_done)
    raise UsageError(f"unknown executor {executor!r}; expected local, process or ray")
