"""Model references, input specs, weights and inputs files, all through real files on disk."""

from __future__ import annotations

import builtins
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from normfold.errors import InputSpecError, ModelLoadError, UsageError
from normfold.models import ZOO, InputSpec, seeded_inputs
from normfold.models.loader import load_inputs_npz, load_model, load_weights, parse_input_spec

MODEL_FILE = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, image):
        return self.bn(self.conv(image))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, img, mask):
        return self.fc(img) * mask


def make_model():
    return Net().eval()


def make_with_example():
    return Net().eval(), torch.randn(1, 3, 8, 8)


def make_two():
    return TwoInputs().eval(), (torch.randn(2, 4), torch.ones(2, 4))


def make_training():
    return Net()  # nn.Module starts in train mode


def make_broken():
    raise ValueError("boom: weights server unreachable")


def make_number():
    return 42


def make_bad_example():
    return Net(), "not a tensor"


NOT_CALLABLE = 3
"""


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_model.py"
    path.write_text(MODEL_FILE)
    return path


# --------------------------------------------------------------------------------------------------------
# zoo references


def test_zoo_ref_gives_eval_module_and_seeded_inputs() -> None:
    loaded = load_model("zoo:unet_resblock")
    assert loaded.input_names == ["x", "t"]
    assert loaded.input_specs == ZOO["unet_resblock"].inputs
    assert [tuple(t.shape) for t in loaded.example_inputs] == [(1, 64, 16, 16), (1, 32)]
    assert not loaded.was_training and not loaded.module.training
    again = load_model("zoo:unet_resblock", seed=0)
    other = load_model("zoo:unet_resblock", seed=1)
    assert torch.equal(loaded.example_inputs[0], again.example_inputs[0])
    assert not torch.equal(loaded.example_inputs[0], other.example_inputs[0])
    assert loaded.to_dict()["inputs"] == ["x:1x64x16x16:float32", "t:1x32:float32"]


def test_unknown_zoo_name_lists_available_models() -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model("zoo:lenet_bm")
    message = str(info.value)
    assert "'lenet_bm'" in message and "did you mean lenet_bn" in message
    assert all(name in message for name in ZOO)


def test_zoo_ref_with_input_override() -> None:
    loaded = load_model("zoo:lenet_bn", inputs=[parse_input_spec("x:4x1x28x28")])
    assert loaded.example_inputs[0].shape == (4, 1, 28, 28)
    with torch.inference_mode():
        assert loaded.module(*loaded.example_inputs).shape == (4, 10)
    with pytest.raises(InputSpecError, match="takes 2 input"):
        load_model("zoo:unet_resblock", inputs=[parse_input_spec("x:1x64x16x16")])


# --------------------------------------------------------------------------------------------------------
# file and module references


def test_file_factory_without_inputs_asks_for_input(model_file: Path) -> None:
    with pytest.raises(InputSpecError, match="--input") as info:
        load_model(f"{model_file}:make_model")
    assert "image" in str(info.value)


def test_file_factory_with_input_specs(model_file: Path) -> None:
    loaded = load_model(f"{model_file}:make_model", inputs=[parse_input_spec("pixels:2x3x8x8")])
    assert loaded.input_names == ["pixels"]  # specs name the inputs
    assert loaded.example_inputs[0].shape == (2, 3, 8, 8)
    with torch.inference_mode():
        assert loaded.module(*loaded.example_inputs).shape == (2, 4, 8, 8)
    with pytest.raises(InputSpecError, match="forward"):
        load_model(f"{model_file}:make_model", inputs=[parse_input_spec("a:1x3"), parse_input_spec("b:1x3")])


def test_file_factory_returning_example_inputs(model_file: Path) -> None:
    loaded = load_model(f"{model_file}:make_with_example")
    assert loaded.input_names == ["image"]  # from forward's signature
    assert loaded.input_specs == (InputSpec("image", (1, 3, 8, 8)),)
    two = load_model(f"{model_file}:make_two")
    assert two.input_names == ["img", "mask"]
    assert [tuple(t.shape) for t in two.example_inputs] == [(2, 4), (2, 4)]
    # specs override the example shapes, same arity
    wider = load_model(f"{model_file}:make_two", inputs=[parse_input_spec("img:5x4"), parse_input_spec("mask:5x4")])
    assert wider.example_inputs[1].shape == (5, 4)


def test_two_files_with_the_same_name_do_not_collide(tmp_path: Path) -> None:
    for sub, width in (("a", 3), ("b", 5)):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "model.py").write_text(
            f"import torch\ndef make():\n    return torch.nn.Linear({width}, 2), torch.randn(1, {width})\n"
        )
    a = load_model(f"{tmp_path / 'a' / 'model.py'}:make")
    b = load_model(f"{tmp_path / 'b' / 'model.py'}:make")
    assert a.example_inputs[0].shape == (1, 3) and b.example_inputs[0].shape == (1, 5)


def test_package_module_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = f"userpkg_{uuid.uuid4().hex[:8]}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "nets.py").write_text(MODEL_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = load_model(f"{package}.nets:make_two")
    assert loaded.input_names == ["img", "mask"]
    with pytest.raises(ModelLoadError, match=f"module not found: '{package}.nope'"):
        load_model(f"{package}.nope:make")


def test_train_mode_module_is_switched_to_eval(model_file: Path) -> None:
    loaded = load_model(f"{model_file}:make_training", inputs=[parse_input_spec("image:1x3x8x8")])
    assert loaded.was_training
    assert not any(m.training for m in loaded.module.modules())


@pytest.mark.parametrize(
    ("ref", "pattern"),
    [
        ("{dir}/missing.py:make", "model file not found: .*missing.py"),
        ("no_such_package_xyz.models:make", "module not found: 'no_such_package_xyz.models'"),
        ("{file}:make_modle", "has no attribute 'make_modle'; did you mean make_model"),
        ("{file}:make_broken", "raised ValueError: boom: weights server unreachable"),
        ("{file}:make_number", "returned int; expected an nn.Module"),
        ("{file}:make_bad_example", "example inputs of type str"),
        ("{file}:NOT_CALLABLE", r"is not callable \(int\); expected a factory"),
        ("just_a_name", "expected a model reference like zoo:NAME"),
    ],
)
def test_bad_references_raise_one_line_model_load_errors(
    ref: str, pattern: str, model_file: Path, tmp_path: Path
) -> None:
    with pytest.raises(ModelLoadError, match=pattern) as info:
        load_model(ref.format(dir=tmp_path, file=model_file))
    assert "\n" not in str(info.value)
    assert isinstance(info.value, UsageError) and info.value.exit_code == 2


def test_file_that_fails_to_import(tmp_path: Path) -> None:
    path = tmp_path / "broken.py"
    path.write_text("import torch\ndef make(:\n")
    with pytest.raises(ModelLoadError, match=r"importing .*broken\.py raised SyntaxError"):
        load_model(f"{path}:make")
    path.write_text("import definitely_not_installed_pkg\n")
    with pytest.raises(ModelLoadError, match="No module named 'definitely_not_installed_pkg'"):
        load_model(f"{path}:make")


# --------------------------------------------------------------------------------------------------------
# input specs


def test_parse_input_spec() -> None:
    assert parse_input_spec("x:1x3x224x224") == InputSpec("x", (1, 3, 224, 224), torch.float32)
    assert parse_input_spec("x:1x3x224x224:float16") == InputSpec("x", (1, 3, 224, 224), torch.float16)
    assert parse_input_spec("ids:2x7:int64").dtype == torch.int64
    assert parse_input_spec("t:8").shape == (8,)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("x:1xax3", "expected NAME:DIMxDIM[:DTYPE], got 'x:1xax3'"),
        ("x", "expected NAME:DIMxDIM[:DTYPE], got 'x'"),
        (":1x3", "expected NAME:DIMxDIM[:DTYPE], got ':1x3'"),
        ("x:1x3:float32:extra", "expected NAME:DIMxDIM[:DTYPE]"),
        ("x:1x3:float13", "unknown dtype 'float13' in 'x:1x3:float13'; expected one of"),
        ("x:0x3", "dimensions must be positive, got 0 in 'x:0x3'"),
        ("x:1x-3", "dimensions must be positive, got -3"),
    ],
)
def test_malformed_input_specs(text: str, message: str) -> None:
    with pytest.raises(InputSpecError) as info:
        parse_input_spec(text)
    assert message in str(info.value)


# --------------------------------------------------------------------------------------------------------
# weights


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


def test_weights_load_strictly_from_state_dict_and_wrappers(tmp_path: Path) -> None:
    torch.manual_seed(123)
    source = _net()
    with torch.no_grad():
        source[1].running_var.uniform_(0.5, 2.0)
    state = source.state_dict()
    for name, payload in (
        ("raw.pt", state),
        ("sd.pt", {"state_dict": state, "epoch": 3}),
        ("m.pt", {"model": state}),
    ):
        path = tmp_path / name
        torch.save(payload, path)
        torch.manual_seed(0)
        target = _net()
        assert not torch.equal(target[0].weight, source[0].weight)
        load_weights(target, path)
        for key, value in state.items():
            assert torch.equal(target.state_dict()[key], value), (name, key)


def test_weights_through_load_model(tmp_path: Path) -> None:
    entry_state = ZOO["conv1d_bn"].build().state_dict()
    changed = {k: (v + 1 if v.is_floating_point() else v) for k, v in entry_state.items()}
    path = tmp_path / "ckpt.pt"
    torch.save(changed, path)
    loaded = load_model("zoo:conv1d_bn", weights=path)
    assert torch.equal(loaded.module.state_dict()["0.weight"], changed["0.weight"])


def test_weights_mismatch_lists_missing_unexpected_and_shapes(tmp_path: Path) -> None:
    state = _net().state_dict()
    state.pop("1.running_var")
    state["2.weight"] = torch.zeros(3)
    state["0.bias"] = torch.zeros(7)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(ModelLoadError) as info:
        load_weights(_net(), path)
    message = str(info.value)
    assert "missing keys: 1.running_var" in message
    assert "unexpected keys: 2.weight" in message
    assert "shape mismatches: 0.bias (7,) vs model (4,)" in message
    assert "\n" not in message


def test_malicious_checkpoint_is_refused_and_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned.txt"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return builtins.exec, (f"open({str(marker)!r}, 'w').write('code ran')",)

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"0.weight": Payload()}}, path)
    with pytest.raises(ModelLoadError, match=r"refused to load .*evil\.pt.*weights_only=True"):
        load_weights(_net(), path)
    with pytest.raises(ModelLoadError, match="refused to load"):
        load_model("zoo:conv1d_bn", weights=path)
    assert not marker.exists()
    # the payload is real: an unsafe load would have run it
    torch.load(path, weights_only=False)
    assert marker.read_text() == "code ran"


def test_unreadable_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="weights file not found"):
        load_weights(_net(), tmp_path / "nope.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(ModelLoadError, match="cannot read checkpoint"):
        load_weights(_net(), corrupt)
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(ModelLoadError, match="holds a list; expected a state_dict"):
        load_weights(_net(), listed)


# --------------------------------------------------------------------------------------------------------
# inputs files


def test_load_inputs_npz(tmp_path: Path) -> None:
    specs = ZOO["unet_resblock"].inputs
    x, t = (a.numpy() for a in seeded_inputs(specs, seed=5))
    path = tmp_path / "in.npz"
    np.savez(path, x=x, t=t, expected=np.zeros(3))
    got = load_inputs_npz(path, specs)
    assert np.array_equal(got[0].numpy(), x) and np.array_equal(got[1].numpy(), t)
    assert [tuple(a.shape) for a in load_inputs_npz(path, ["t"])] == [(1, 32)]


def test_load_inputs_npz_errors(tmp_path: Path) -> None:
    specs = (InputSpec("x", (1, 3)),)
    path = tmp_path / "in.npz"
    np.savez(path, y=np.zeros((1, 3), np.float32))
    with pytest.raises(InputSpecError, match="has no array 'x' \\(has: y\\)"):
        load_inputs_npz(path, specs)
    np.savez(path, x=np.zeros((2, 3), np.float32))
    with pytest.raises(InputSpecError, match="has shape 2x3, expected 1x3"):
        load_inputs_npz(path, specs)
    np.savez(path, x=np.zeros((1, 3), np.float64))
    with pytest.raises(InputSpecError, match="is float64, expected float32"):
        load_inputs_npz(path, specs)
    with pytest.raises(InputSpecError, match="inputs file not found"):
        load_inputs_npz(tmp_path / "missing.npz", specs)
    bad = tmp_path / "bad.npz"
    bad.write_text("not a zip")
    with pytest.raises(InputSpecError, match="cannot read inputs file"):
        load_inputs_npz(bad, specs)


def test_inputs_npz_with_object_arrays_is_not_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "obj.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputSpecError, match="cannot read inputs file"):
        load_inputs_npz(path, ["x"])


def test_input_spec_dtype_reaches_example_inputs() -> None:
    loaded = load_model("zoo:conv1d_bn", inputs=[parse_input_spec("x:3x4x16:float64")])
    assert loaded.example_inputs[0].dtype == torch.float64
    assert loaded.input_specs[0].describe() == "x:3x4x16:float64"
