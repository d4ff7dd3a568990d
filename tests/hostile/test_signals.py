"""Real processes, real signals: SIGTERM unwinds like Ctrl-C (cleanup, one line, 143), an interrupt is 130
even when third-party code swallows it, and gate workers never outlive the gate or their deadline."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals and prctl: Linux only"),
    pytest.mark.slow,  # real interpreters that import torch: seconds each
]


def test_swallowed_ctrl_c_is_still_exit_130(cli, work: Path, models_dir: Path) -> None:
    """Ctrl-C that the exporter turns into another error (an AttributeError) is exit 130, not bad input."""
    proc = cli.run(
        ["export", f"{models_dir}/models.py:swallows_interrupt", "--input", "x:1x4", "--exporter", "torchscript",
         "--opset", "17", "-o", "m.onnx"],
        work, TMPDIR=str(work / "_tmp"),
    )  # fmt: skip
    assert proc.returncode == 130, proc.stderr
    assert cli.error_lines(proc.stderr) == ["error: interrupted"]
    assert "Traceback" not in proc.stderr
    assert not (work / "m.onnx").exists()


def test_sigterm_during_export_cleans_up_and_exits_143(cli, work: Path, models_dir: Path) -> None:
    """SIGTERM while the TorchScript exporter runs forward: its temp folder is removed, nothing is written."""
    proc = cli.run(
        ["export", f"{models_dir}/models.py:terms_itself", "--input", "x:1x4", "--exporter", "torchscript",
         "--opset", "17", "-o", "m.onnx"],
        work, TMPDIR=str(work / "_tmp"),
    )  # fmt: skip
    assert proc.returncode == 143, proc.stderr
    assert cli.error_lines(proc.stderr) == ["error: terminated (SIGTERM)"]
    assert "Traceback" not in proc.stderr
    assert not (work / "m.onnx").exists()
    assert not [p for p in (work / "_tmp").iterdir() if p.name.startswith("normfold-")]


def test_sigterm_inside_an_atomic_write_removes_the_temporary_file(work: Path) -> None:
    script = textwrap.dedent(
        f"""
        import os, signal, sys, time
        from normfold.cli import _signals
        from normfold.io import atomic_open
        _signals.install()
        try:
            with atomic_open({str(work / "out.bin")!r}, "wb") as fh:
                fh.write(b"x" * 2_000_000)
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(10)
        except KeyboardInterrupt:
            sys.exit(_signals.interrupt_code(sys.exc_info()[1]))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 143, proc.stderr
    assert not (work / "out.bin").exists()
    assert not list(work.glob(".out.bin.*.tmp"))


# ------------------------------------------------------------------------------------------------------
# gate workers


def _gate(work: Path, models_dir: Path, timeout_s: float) -> subprocess.Popen[str]:
    config = work / "normfold.toml"
    config.write_text(
        f'executor = "process"\n[defaults]\noptimize = false\nper_layer = false\ntimeout_s = {timeout_s}\n'
        '[reports]\njunit = "out/junit.xml"\n'
        f'[[models]]\nref = "{models_dir}/models.py:hangs"\ninputs = ["x:1x4"]\nonnx = "{work}/tiny.onnx"\n'
    )
    env = dict(os.environ, NORMFOLD_TEST_PIDFILE=str(work / "worker.pid"), TMPDIR=str(work / "_tmp"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return subprocess.Popen(
        [sys.executable, "-m", "normfold", "gate", str(config), "--quiet"],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _worker_pid(work: Path, gate: subprocess.Popen[str], within: float = 180) -> int:
    deadline = time.monotonic() + within
    pidfile = work / "worker.pid"
    while time.monotonic() < deadline:
        if pidfile.is_file() and pidfile.read_text().strip():
            return int(pidfile.read_text())
        assert gate.poll() is None, gate.communicate()
        time.sleep(0.2)
    gate.kill()
    pytest.fail("the worker never started its case")


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def _spawn_worker_under(parent_script: str, work: Path, models_dir: Path) -> tuple[subprocess.Popen[str], int]:
    """Run ``parent_script`` (which starts a real worker and prints its pid); return the parent and that pid."""
    env = dict(os.environ, NORMFOLD_TEST_PIDFILE=str(work / "worker.pid"), TMPDIR=str(work / "_tmp"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_script], cwd=work, env=env, stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    return parent, int(parent.stdout.readline())


_WORKER_PARENT = """
import os, socket, subprocess, sys, time
from multiprocessing.connection import Connection
from normfold.gate.cases import CaseSpec
from normfold.gate.config import CaseSettings
parent, child = socket.socketpair()
proc = subprocess.Popen([sys.executable, "-m", "normfold.gate._worker", str(child.fileno()), str(os.getpid())],
                        pass_fds=(child.fileno(),), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(proc.pid, flush=True)
conn = Connection(parent.detach())
conn.send(CaseSpec("hangs[ort-cpu-fp32]", "hangs", "{ref}", "ort-cpu", "fp32",
                   CaseSettings(timeout_s={timeout}, optimize=False, per_layer=False),
                   onnx="{onnx}", inputs=["x:1x4"], unavailable=""))
time.sleep(600)  # the parent never enforces the deadline, never reads, never stops the worker
"""


def test_gate_worker_dies_with_its_parent(work: Path, models_dir: Path) -> None:
    """SIGKILL to the worker's parent: no handler runs there; the kernel's parent-death signal ends the worker."""
    script = _WORKER_PARENT.format(ref=f"{models_dir}/models.py:hangs", timeout=600, onnx=work / "tiny.onnx")
    parent, pid = _spawn_worker_under(script, work, models_dir)
    try:
        _wait_for(work / "worker.pid", parent)
        parent.kill()
        parent.wait(30)
        assert _gone_within(pid, 10), "worker outlived its parent"
    finally:
        parent.kill()
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_gate_worker_keeps_its_deadline_without_its_parent(work: Path, models_dir: Path) -> None:
    """The parent enforces nothing: the worker still ends its hung case at timeout_s plus the grace period."""
    script = _WORKER_PARENT.format(ref=f"{models_dir}/models.py:hangs", timeout=0.5, onnx=work / "tiny.onnx")
    parent, pid = _spawn_worker_under(script, work, models_dir)
    try:
        _wait_for(work / "worker.pid", parent)
        assert _gone_within(pid, 20), "worker ran past its deadline"
        assert parent.poll() is None  # the parent was alive all along
    finally:
        parent.kill()
        parent.wait(30)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _wait_for(path: Path, parent: subprocess.Popen[str], within: float = 120) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().strip():
            return
        assert parent.poll() is None, "the worker's parent ended early"
        time.sleep(0.1)
    pytest.fail("the worker never started its case")


def test_gate_sigterm_stops_workers_writes_reports_and_exits_143(work: Path, models_dir: Path) -> None:
    gate = _gate(work, models_dir, timeout_s=300)
    pid = _worker_pid(work, gate)
    gate.send_signal(signal.SIGTERM)
    _, stderr = gate.communicate(timeout=60)
    try:
        assert gate.returncode == 143, stderr
        assert "error: terminated (SIGTERM)" in stderr and "Traceback" not in stderr
        assert _gone_within(pid, 10), "worker outlived the gate"
        junit = (work / "out" / "junit.xml").read_text()
        assert "interrupted before a verdict" in junit
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
