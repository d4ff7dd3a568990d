"""Functional ops called in a module's own forward are compared and named with their ``file:line``.

Real dynamo export, real optimize, real ONNX Runtime. A fault in ``F.gelu``/``F.silu``/``F.relu`` used to be
blamed on the next conv ("its input from ops of <root> is not compared"); now the op itself is the first
divergence, with the call site the exporter recorded.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normfold.exporter import export
from normfold.fusers import optimize
from normfold.numerics import compare
from normfold.numerics.functional import STACK_TRACE_KEY, site_key


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pw1 = nn.Conv2d(8, 16, 1)
        self.pw2 = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw2(F.silu(self.pw1(x))) + x


class FunctionalNet(nn.Module):
    """Conv → F.gelu → Block (F.silu inside) → F.relu → conv → global average pool."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.block = Block()
        self.c2 = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.c1(x))
        y = F.relu(self.block(y))
        return self.c2(y).mean((2, 3))


def _line(fragment: str) -> int:
    """The source line of FunctionalNet/Block calling ``fragment`` (what the report must name)."""
    for cls in (FunctionalNet, Block):
        lines, start = inspect.getsourcelines(cls.forward)
        for k, text in enumerate(lines):
            if fragment in text:
                return start + k
    raise AssertionError(fragment)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, torch.Tensor, Path]:
    torch.manual_seed(0)
    model = FunctionalNet().eval()
    x = torch.randn(1, 3, 12, 12)
    tmp = tmp_path_factory.mktemp("functional")
    raw = export(model, (x,), tmp / "f.onnx").path
    optimize(raw, tmp / "f.opt.onnx")
    return model, x, tmp / "f.opt.onnx"


def _swap_op(src: Path, dst: Path, op_type: str, new: str) -> None:
    proto = onnx.load(str(src))
    node = next(n for n in proto.graph.node if n.op_type == op_type)
    node.op_type = new
    del node.attribute[:]
    onnx.save(proto, str(dst))


def test_clean_functional_ops_are_compared_and_pass(exported) -> None:
    model, x, path = exported
    layers = compare(model, path, [x], per_layer=True).backends["ort-cpu"].layers
    assert layers.passed and layers.counts["unmatched"] == 0
    names = [row.name for row in layers.layers if row.kind == "functional"]
    for op, owner, fragment in (
        ("F.gelu", "<root>", "F.gelu("),
        ("F.silu", "block", "F.silu("),
        ("F.relu", "<root>", "F.relu("),
    ):
        assert f"{owner}: {op} @ test_functional.py:{_line(fragment)}" in names, names
    pw1 = next(row for row in layers.layers if row.module == "block.pw1")
    assert pw1.inputs_from == [f"<root>: F.gelu @ test_functional.py:{_line('F.gelu(')}"]


@pytest.mark.parametrize(
    ("op_type", "new", "op", "owner", "fragment"),
    [
        ("Gelu", "Relu", "F.gelu", "<root>", "F.gelu("),
        ("Relu", "Sigmoid", "F.relu", "<root>", "F.relu("),
    ],
)
def test_a_changed_functional_op_is_named_with_its_call_site(
    exported, tmp_path: Path, op_type: str, new: str, op: str, owner: str, fragment: str
) -> None:
    model, x, path = exported
    bad = tmp_path / "bad.onnx"
    _swap_op(path, bad, op_type, new)
    report = compare(model, bad, [x], per_layer=True)
    assert not report.passed
    first = report.backends["ort-cpu"].layers.first_divergence
    assert first is not None and first.name == f"{owner}: {op} @ test_functional.py:{_line(fragment)}"
    assert first.op_type == new and "match eager, so the error enters inside it" in first.explanation


def test_silu_fault_inside_a_block_names_the_op_not_the_next_conv(exported, tmp_path: Path) -> None:
    """F.silu is exported as Sigmoid+Mul under ``block``; a wrong Mul input is that op's fault."""
    model, x, path = exported
    proto = onnx.load(str(path))
    sigmoid = next(n for n in proto.graph.node if n.op_type == "Sigmoid")
    sigmoid.op_type = "Tanh"
    bad = tmp_path / "silu.onnx"
    onnx.save(proto, str(bad))
    first = compare(model, bad, [x], per_layer=True).backends["ort-cpu"].layers.first_divergence
    assert first is not None and first.name == f"block: F.silu @ test_functional.py:{_line('F.silu(')}"


def test_functional_ops_pair_when_the_export_ran_from_another_checkout(exported, tmp_path: Path) -> None:
    """The export records absolute source paths; a model exported in another venv or checkout (a CI
    artifact) must still pair its functional ops by the path inside the project or site-packages."""
    model, x, path = exported
    here = str(Path(__file__).resolve().parent.parent.parent)
    proto = onnx.load(str(path))
    moved = 0
    for node in proto.graph.node:
        for prop in node.metadata_props:
            if prop.key == STACK_TRACE_KEY and here in prop.value:
                prop.value = prop.value.replace(here, "/elsewhere/checkout")
                moved += 1
    assert moved
    onnx.save(proto, str(tmp_path / "moved.onnx"))
    layers = compare(model, tmp_path / "moved.onnx", [x], per_layer=True).backends["ort-cpu"].layers
    names = [row.name for row in layers.layers if row.kind == "functional"]
    assert layers.passed and layers.counts["unmatched"] == 0
    assert f"<root>: F.gelu @ test_functional.py:{_line('F.gelu(')}" in names, names


def test_site_key_names_a_file_independent_of_where_it_was_installed() -> None:
    a = "/work/a/.venv/lib/python3.11/site-packages/torchvision/models/convnext.py"
    b = "/opt/conda/lib/python3.11/site-packages/torchvision/models/convnext.py"
    assert site_key(a) == site_key(b) == "torchvision/models/convnext.py"
    assert site_key("/home/u/proj/tests/model.py") == site_key("/ci/build/tests/model.py") == "tests/model.py"
    assert site_key("/home/u/proj/a/model.py") != site_key("/home/u/proj/b/model.py")
