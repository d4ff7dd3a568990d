"""Tiny ONNX models (built with onnx.helper, no export) and a matching torch module for bench tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

FEATURES = 16


def weight() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((FEATURES, FEATURES)).astype(np.float32)


def make_onnx(path: Path, dims: list[int | str]) -> Path:
    """``y = relu(x @ W)`` with input shape ``dims`` (last dim FEATURES)."""
    w = numpy_helper.from_array(weight(), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*dims[:-1], FEATURES])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


class Tiny(nn.Module):
    """The eager twin of :func:`make_onnx`: ``relu(x @ W)`` as Linear(weight=Wᵀ)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(FEATURES, FEATURES, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.from_numpy(weight().T.copy()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench_models")


@pytest.fixture(scope="session")
def static_onnx(models_dir: Path) -> Path:
    return make_onnx(models_dir / "static.onnx", [2, FEATURES])


@pytest.fixture(scope="session")
def dynamic_onnx(models_dir: Path) -> Path:
    return make_onnx(models_dir / "dynamic.onnx", ["batch", FEATURES])


@pytest.fixture(scope="session")
def seq_onnx(models_dir: Path) -> Path:
    """Dynamic batch *and* a dynamic sequence dimension: needs --input for the latter."""
    return make_onnx(models_dir / "seq.onnx", ["batch", "seq", FEATURES])


@pytest.fixture()
def tiny_module() -> Tiny:
    return Tiny().eval()


@pytest.fixture(scope="session")
def factory_file(models_dir: Path) -> Path:
    """A ``file.py:factory`` model reference returning the eager twin with an example input."""
    np.save(models_dir / "w.npy", weight())
    path = models_dir / "tiny_factory.py"
    path.write_text(
        "from pathlib import Path\n"
        "import numpy as np\n"
        "import torch\n"
        "from torch import nn\n\n"
        "class Tiny(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        f"        self.fc = nn.Linear({FEATURES}, {FEATURES}, bias=False)\n"
        "        w = np.load(Path(__file__).with_name('w.npy'))\n"
        "        with torch.no_grad():\n"
        "            self.fc.weight.copy_(torch.from_numpy(w.T.copy()))\n\n"
        "    def forward(self, x):\n"
        "        return torch.relu(self.fc(x))\n\n"
        "def factory():\n"
        f"    return Tiny(), (torch.zeros(1, {FEATURES}),)\n"
    )
    return path
