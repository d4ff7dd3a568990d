"""Fixtures for the hostile-input suite: a tiny real ONNX model, user model files, and the checks every case
makes (exit code, one ``error:`` line, no traceback, no stray temporary file anywhere we can see)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from normfold.cli import app

REPO_ROOT = Path(__file__).resolve().parents[2]
#: What third-party code leaves in $TMPDIR on purpose: onnxruntime's ``.ses`` id file, torch's compile cache.
THIRD_PARTY_TMP = (".ses", "torchinductor_")

USER_MODELS = textwrap.dedent(
    """
    import os
    import signal
    import sys
    import time

    import torch
    from torch import nn


    class Tiny(nn.Module):
        def forward(self, x):
            return torch.relu(x)


    class ExitForward(nn.Module):
        def forward(self, x):
            sys.exit(0)


    class SwallowsInterrupt(nn.Module):
        '''Like torch's exporter when Ctrl-C lands in an import: the interrupt becomes an AttributeError.'''

        def forward(self, x):
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            except BaseException:
                raise AttributeError("module 'torch._dynamo' has no attribute 'exc'") from None
            return x


    class TermsItself(nn.Module):
        def forward(self, x):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            return x


    class Hangs(nn.Module):
        def forward(self, x):
            with open(os.environ["NORMFOLD_TEST_PIDFILE"], "w") as fh:
                fh.write(str(os.getpid()))
            time.sleep(120)
            return x


    def tiny():
        return Tiny()


    def tiny_with_inputs():
        return Tiny(), torch.ones(1, 4)


    def exit0():
        sys.exit(0)


    def exit1():
        sys.exit(1)


    def exit_forward():
        return ExitForward()


    def exit_forward_with_inputs():
        return ExitForward(), torch.ones(1, 4)


    def base_exception():
        raise GeneratorExit("factory gave up")


    def training():
        return nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))


    def swallows_interrupt():
        return SwallowsInterrupt()


    def terms_itself():
        return TermsItself()


    def hangs():
        return Hangs()


    def prints_then_fails():
        print("graph(%x : Float(1, 4)):\\n" * 200)  # a third-party dump on stdout, then a failure
        raise RuntimeError("export exploded")


    def seq():
        return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    """
)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """User model code: ``models.py`` (factories) and ``exits_on_import.py``; a tiny Relu ONNX beside them."""
    d = tmp_path_factory.mktemp("hostile_models")
    (d / "models.py").write_text(USER_MODELS)
    (d / "exits_on_import.py").write_text("import sys\nsys.exit(3)\n")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "tiny", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(d / "tiny.onnx"))
    for value in (*model.graph.input, *model.graph.output):  # the same model with a dynamic batch
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    onnx.save(model, str(d / "tiny_dyn.onnx"))
    return d


@pytest.fixture
def work(tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A working folder with a copy of the tiny model and a private $TMPDIR, checked for leftovers after."""
    for name in ("tiny.onnx", "tiny_dyn.onnx"):
        (tmp_path / name).write_bytes((models_dir / name).read_bytes())
    private_tmp = tmp_path / "_tmp"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    monkeypatch.setenv("TMPDIR", str(private_tmp))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    assert_no_leftovers(tmp_path)


def assert_no_leftovers(root: Path) -> None:
    """No hidden ``.NAME.XXXX.tmp`` of an atomic writer and nothing left in the private $TMPDIR."""
    stray = [p for p in root.rglob(".*.tmp")]
    assert not stray, f"temporary files left behind: {stray}"
    private_tmp = root / "_tmp"
    if private_tmp.is_dir():
        left = [p for p in private_tmp.iterdir() if not p.name.startswith(THIRD_PARTY_TMP)]
        assert not left, f"left in $TMPDIR: {left}"


_runner = CliRunner()


def invoke(*args: Any) -> Any:
    return _runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result: Any, code: int, *needles: str) -> str:
    """Exit ``code``, exactly one ``error: …`` line on stderr, no traceback; returns the line."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Usage:" not in result.output
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def run_cli(args: list[str], cwd: Path, timeout: float = 240, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m normfold ARGS`` as a real process (for sys.exit isolation and signals)."""
    environ = dict(os.environ, **env)
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-m", "normfold", *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


class Cli:
    """The helpers above, handed to tests as the ``cli`` fixture (tests cannot import conftest)."""

    invoke = staticmethod(invoke)
    error = staticmethod(assert_one_line_error)
    run = staticmethod(run_cli)
    error_lines = staticmethod(error_lines)
    no_leftovers = staticmethod(assert_no_leftovers)


@pytest.fixture(scope="session")
def cli() -> Cli:
    return Cli()
