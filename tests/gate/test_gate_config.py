"""Config: file discovery, strict keys naming the key and the file, and the precedence of overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from normfold.errors import ConfigError
from normfold.gate import config_from_dict, load_config, plan_cases
from normfold.gate.baseline import Baseline
from normfold.gate.config import OutputTolerance
from normfold.gate.records import BaselineEntry, LatencyReference

EXAMPLE = """
jobs = 2
require = ["ort-cpu"]
baseline = "baseline.json"

[defaults]
backends = ["ort-cpu"]
precisions = ["fp32"]
exporter = "torchscript"
opset = 17
atol = 1e-5
timeout_s = 120

[reports]
junit = "out/junit.xml"
json = "out/report.json"

[[models]]
ref = "zoo:resnet_basic"
rtol = 1e-3
latency_budget_ms = { ort-cpu = 5.0 }

[[models]]
name = "shipped"
ref = "zoo:conv1d_bn"
onnx = "artifacts/conv1d.onnx"
inputs_npz = "data/samples.npz"
backends = ["ort-cpu", "ort-cuda"]
precisions = ["fp32", "fp16"]
optimize = false
[models.outputs.logits]
atol = 1e-3
"""


def test_normfold_toml_is_found_and_validated(tmp_path: Path) -> None:
    (tmp_path / "normfold.toml").write_text(EXAMPLE)
    config = load_config(tmp_path)
    assert config.source == str(tmp_path / "normfold.toml")
    assert config.jobs == 2 and config.effective_executor() == "process"
    assert config.reports.json_path == "out/report.json"
    assert config.resolve(config.baseline) == tmp_path / "baseline.json"


def test_pyproject_tool_table_is_read(tmp_path: Path) -> None:
    body = EXAMPLE.replace("[defaults]", "[tool.normfold.defaults]").replace("[reports]", "[tool.normfold.reports]")
    body = body.replace("[[models]]", "[[tool.normfold.models]]").replace(
        "[models.outputs", "[tool.normfold.models.outputs"
    )
    top, _, rest = body.partition("[tool.normfold.defaults]")
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\n\n[tool.normfold]\n' + top + "[tool.normfold.defaults]" + rest
    )
    config = load_config(tmp_path / "pyproject.toml")
    assert config.source.endswith("pyproject.toml [tool.normfold]")
    assert [m.ref for m in config.models] == ["zoo:resnet_basic", "zoo:conv1d_bn"]
    assert load_config(tmp_path).source == config.source  # found from the directory too


def test_unknown_key_names_the_key_and_the_file(tmp_path: Path) -> None:
    path = tmp_path / "normfold.toml"
    path.write_text(EXAMPLE.replace("rtol = 1e-3", "rtoll = 1e-3"))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "unknown key 'models[0].rtoll'" in str(e.value)
    assert str(path) in str(e.value)


def test_unknown_key_in_nested_tables(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'defaults.tolerance'"):
        config_from_dict({"defaults": {"tolerance": 1}, "models": [{"ref": "zoo:x"}]}, source="cfg.toml")
    with pytest.raises(ConfigError, match=r"cfg.toml: unknown key 'models\[0\].outputs.y.atoll'"):
        config_from_dict({"models": [{"ref": "zoo:x", "outputs": {"y": {"atoll": 1}}}]}, source="cfg.toml")


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"models": []}, "models"),
        ({}, "missing required key 'models'"),
        ({"models": [{"name": "x"}]}, "missing required key 'models[0].ref'"),
        ({"defaults": {"backends": ["ort-gpu"]}, "models": [{"ref": "zoo:x"}]}, "unknown backend 'ort-gpu'"),
        ({"defaults": {"precisions": ["int8"]}, "models": [{"ref": "zoo:x"}]}, "unknown precision 'int8'"),
        ({"executor": "slurm", "models": [{"ref": "zoo:x"}]}, "executor"),
        ({"defaults": {"atol": -1}, "models": [{"ref": "zoo:x"}]}, "defaults.atol"),
    ],
)
def test_invalid_values_are_config_errors(data: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict(data, source="bad.toml")
    assert "bad.toml" in str(e.value) and fragment in str(e.value)


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "normfold.toml").write_text("models = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match=r"gate config not found: .*missing\.toml"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "sub").mkdir()
    with pytest.raises(ConfigError, match="no gate config found"):
        load_config(tmp_path / "sub")


def test_model_keys_override_defaults_and_cases_expand(tmp_path: Path) -> None:
    (tmp_path / "normfold.toml").write_text(EXAMPLE)
    config = load_config(tmp_path)
    specs = plan_cases(config)
    assert [s.case_id for s in specs] == [
        "resnet_basic[ort-cpu-fp32]",
        "shipped[ort-cpu-fp32]",
        "shipped[ort-cpu-fp16]",
        "shipped[ort-cuda-fp32]",
        "shipped[ort-cuda-fp16]",
    ]
    resnet, shipped = specs[0], specs[1]
    assert resnet.settings.atol == 1e-5 and resnet.settings.rtol == 1e-3  # default + own override
    assert resnet.settings.opset == 17 and resnet.timeout_s == 120
    assert resnet.bench  # a latency budget for its backend asks for a benchmark
    assert not shipped.bench
    assert shipped.settings.optimize is False
    assert shipped.settings.outputs == {"logits": OutputTolerance(atol=1e-3, rtol=None)}
    assert shipped.onnx == str(tmp_path / "artifacts/conv1d.onnx")
    assert shipped.inputs_npz == str(tmp_path / "data/samples.npz")
    assert resnet.required and not specs[3].required  # require = ["ort-cpu"] in the file
    assert plan_cases(config, require=["ort-cuda"])[3].required  # a flag adds to the file's list


def test_baseline_with_latency_or_update_turns_bench_on(tmp_path: Path) -> None:
    config = config_from_dict({"models": [{"ref": "zoo:conv1d_bn"}]}, base_dir=tmp_path)
    assert not plan_cases(config)[0].bench
    assert plan_cases(config, update=True)[0].bench
    stored = Baseline(cases={"conv1d_bn[ort-cpu-fp32]": BaselineEntry(p50_ms=1.0, artifact="b-artifacts/c.onnx")})
    (spec,) = plan_cases(config, baseline=stored)
    assert spec.bench and spec.latency_baseline == LatencyReference(1.0, 0.10, None, str(Path("b-artifacts/c.onnx")))
    assert plan_cases(config, baseline=stored, update=True)[0].latency_baseline is None


def test_duplicate_case_ids_and_conflicting_inputs_are_errors() -> None:
    twice = config_from_dict({"models": [{"ref": "zoo:conv1d_bn"}, {"ref": "zoo:conv1d_bn"}]}, source="dup.toml")
    with pytest.raises(ConfigError, match=r"two models produce case conv1d_bn\[ort-cpu-fp32\]"):
        plan_cases(twice)
    both = config_from_dict({"models": [{"ref": "zoo:x", "inputs": ["x:1x2"], "inputs_npz": "a.npz"}]})
    with pytest.raises(ConfigError, match="sets both 'inputs' and 'inputs_npz'"):
        plan_cases(both)
