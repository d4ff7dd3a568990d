"""Hostile command lines: argument-type errors, output destinations that cannot be written or are the
command's own inputs, rich markup in paths, tables in a pipe, huge shapes and silently ignored flags.

Every refusal is exit 2 with one ``error:`` line, no Usage box, no traceback, and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

READ_ONLY = Path("/sys")  # read-only even for root; a real refusal from the kernel, not a permission bit


def _has_read_only_dir() -> bool:
    try:
        (READ_ONLY / ".normfold-probe").touch()
    except OSError:
        return True
    return False


needs_read_only = pytest.mark.skipif(not _has_read_only_dir(), reason="no read-only directory (/sys) here")


# ------------------------------------------------------------------------------------------------------
# argument-type errors: one line, no Usage box


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["export", "zoo:lenet_bn", "-o", "m.onnx", "--opset", "abc"], "--opset"),
        (["gate", "--jobs", "0"], "--jobs"),
        (["demo", "--jobs", "0"], "--jobs"),
        (["run", "tiny.onnx", "--seed", "xyz"], "--seed"),
        (["bench", "tiny.onnx", "--iters", "many"], "--iters"),
        (["optimize", "tiny.onnx", "--atol", "tight"], "--atol"),
        (["export", "zoo:lenet_bn"], "--output"),
        (["frobnicate"], "frobnicate"),
        (["run", "tiny.onnx", "--frobnicate"], "--frobnicate"),
    ],
    ids=["opset-abc", "gate-jobs-0", "demo-jobs-0", "seed-xyz", "iters-many", "atol-word", "no-output", "cmd", "opt"],
)
def test_argument_errors_are_one_line(cli, work: Path, args: list[str], needle: str) -> None:
    cli.error(cli.invoke(*args), 2, needle)


# ------------------------------------------------------------------------------------------------------
# no command writes over one of its own inputs


def test_run_refuses_to_overwrite_its_model(cli, work: Path) -> None:
    before = (work / "tiny.onnx").read_bytes()
    cli.error(cli.invoke("run", "tiny.onnx", "-o", "tiny.onnx"), 2, "also an input")
    assert (work / "tiny.onnx").read_bytes() == before


def test_run_refuses_to_overwrite_its_inputs_npz(cli, work: Path) -> None:
    np.savez(work / "in.npz", x=np.ones((1, 4), np.float32))
    cli.error(cli.invoke("run", "tiny.onnx", "--inputs", "in.npz", "-o", "in.npz"), 2, "also an input")


def test_run_refuses_the_model_through_another_spelling(cli, work: Path) -> None:
    (work / "sub").mkdir()
    cli.error(cli.invoke("run", "tiny.onnx", "-o", "sub/../tiny.onnx"), 2, "also an input")


def test_optimize_refuses_to_overwrite_its_model(cli, work: Path) -> None:
    cli.error(cli.invoke("optimize", "tiny.onnx", "-o", "tiny.onnx"), 2, "also an input")


def test_optimize_report_refuses_the_model(cli, work: Path) -> None:
    cli.error(cli.invoke("optimize", "tiny.onnx", "--report", "tiny.onnx"), 2, "--report", "also an input")


def test_compare_report_refuses_the_model(cli, work: Path, models_dir: Path) -> None:
    res = cli.invoke(
        "compare", f"{models_dir}/models.py:tiny", "tiny.onnx", "--input", "x:1x4", "--report", "tiny.onnx"
    )
    cli.error(res, 2, "also an input")


def test_compare_report_refuses_the_model_file(cli, work: Path) -> None:
    (work / "m.py").write_text("import torch\ndef f():\n    return torch.nn.ReLU()\n")
    res = cli.invoke("compare", "m.py:f", "tiny.onnx", "--input", "x:1x4", "--report", "m.py")
    cli.error(res, 2, "also an input")
    assert "torch.nn.ReLU" in (work / "m.py").read_text()


def test_export_refuses_to_overwrite_the_model_file(cli, work: Path) -> None:
    (work / "m.py").write_text("import torch\ndef f():\n    return torch.nn.ReLU()\n")
    cli.error(cli.invoke("export", "m.py:f", "--input", "x:1x4", "-o", "m.py"), 2, "also an input")


def test_bench_json_refuses_the_model(cli, work: Path) -> None:
    cli.error(cli.invoke("bench", "tiny.onnx", "--json", "tiny.onnx"), 2, "also an input")


def test_gate_report_refuses_its_config(cli, work: Path, models_dir: Path) -> None:
    config = _gate_config(work, models_dir, "tiny")
    cli.error(cli.invoke("gate", config, "--junit", config), 2, "also an input")


# ------------------------------------------------------------------------------------------------------
# output destinations are checked before the work: exit 2, never "internal error"


@needs_read_only
@pytest.mark.parametrize(
    "args",
    [
        ["run", "tiny.onnx", "-o", f"{READ_ONLY}/out.npz"],
        ["export", "zoo:lenet_bn", "-o", f"{READ_ONLY}/m.onnx"],
        ["optimize", "tiny.onnx", "-o", f"{READ_ONLY}/m.onnx"],
        ["optimize", "tiny.onnx", "--report", f"{READ_ONLY}/r.json"],
        ["bench", "tiny.onnx", "--json", f"{READ_ONLY}/b.json"],
        ["triton", "tiny.onnx", "--repo", f"{READ_ONLY}/repo"],
        ["demo", "--report-dir", f"{READ_ONLY}/report"],
    ],
    ids=["run", "export", "optimize", "optimize-report", "bench", "triton", "demo"],
)
def test_read_only_destination_is_refused_first(cli, work: Path, args: list[str]) -> None:
    cli.error(cli.invoke(*args), 2, "cannot write")


@needs_read_only
def test_compare_report_in_read_only_dir(cli, work: Path, models_dir: Path) -> None:
    res = cli.invoke(
        "compare", f"{models_dir}/models.py:tiny", "tiny.onnx", "--input", "x:1x4", "--report", f"{READ_ONLY}/r.md"
    )
    cli.error(res, 2, "cannot write")


@needs_read_only
def test_gate_report_in_read_only_dir_is_refused_before_any_case(cli, work: Path, models_dir: Path) -> None:
    config = _gate_config(work, models_dir, "exit0")
    res = cli.invoke("gate", config, "--junit", f"{READ_ONLY}/junit.xml")
    cli.error(res, 2, "cannot write")
    assert "sys.exit" not in res.output  # no case ran


def test_output_under_a_file_is_refused(cli, work: Path) -> None:
    (work / "afile").write_text("x")
    cli.error(cli.invoke("run", "tiny.onnx", "-o", "afile/out.npz"), 2, "is a file, not a directory")


def test_output_that_is_a_directory_is_refused(cli, work: Path) -> None:
    (work / "adir").mkdir()
    cli.error(cli.invoke("run", "tiny.onnx", "-o", "adir"), 2, "is a directory")


def test_triton_repo_that_is_a_file_is_refused(cli, work: Path) -> None:
    (work / "repo").write_text("not a folder")
    cli.error(cli.invoke("triton", "tiny.onnx", "--repo", "repo"), 2, "existing file")
    assert (work / "repo").read_text() == "not a folder"


def test_demo_report_dir_that_is_a_file_is_refused(cli, work: Path) -> None:
    (work / "rep").write_text("x")
    cli.error(cli.invoke("demo", "--report-dir", "rep"), 2, "existing file")


def test_gate_summary_that_is_a_directory_is_refused(cli, work: Path, models_dir: Path) -> None:
    (work / "sumdir").mkdir()
    cli.error(cli.invoke("gate", _gate_config(work, models_dir, "tiny"), "--summary", "sumdir"), 2, "is a directory")


def test_random_bytes_baseline_is_a_config_error(cli, work: Path, models_dir: Path) -> None:
    (work / "base.json").write_bytes(bytes(range(256)) * 4)
    config = _gate_config(work, models_dir, "tiny", extra='baseline = "base.json"\n')
    cli.error(cli.invoke("gate", config), 2, "base.json")


# ------------------------------------------------------------------------------------------------------
# rich markup in user strings is printed literally


def test_square_brackets_in_output_path(cli, work: Path) -> None:
    res = cli.invoke("run", "tiny.onnx", "-o", "out[fp16].npz")
    assert res.exit_code == 0, res.output
    assert "wrote out[fp16].npz" in res.stdout
    assert (work / "out[fp16].npz").is_file()


def test_closing_tag_in_output_path_does_not_crash(cli, work: Path) -> None:
    res = cli.invoke("optimize", "tiny.onnx", "-o", "opt[/x].onnx", "--no-verify")
    assert res.exit_code == 0, res.output
    assert "wrote opt[/x].onnx" in res.stdout
    assert (work / "opt[").is_dir()  # the path was taken literally: folder "opt[" holding "x].onnx"


def test_markup_in_model_path_is_shown_literally(cli, work: Path) -> None:
    (work / "[red]m.onnx").write_bytes((work / "tiny.onnx").read_bytes())
    res = cli.invoke("run", "[red]m.onnx")
    assert res.exit_code == 0, res.output
    assert "[red]m.onnx on ort-cpu" in res.stdout


# ------------------------------------------------------------------------------------------------------
# tables in a pipe keep every number


def test_bench_table_in_a_pipe_is_not_truncated(cli, work: Path) -> None:
    res = cli.invoke("bench", "tiny.onnx", "--iters", "5", "--warmup", "1")
    assert res.exit_code == 0, res.output
    assert "…" not in res.stdout
    row = next(line for line in res.stdout.splitlines() if "ort-cpu" in line)
    assert len(row.split("│")) >= 14  # all 13 columns on one line


def test_compare_table_in_a_pipe_is_not_truncated(cli, work: Path, models_dir: Path) -> None:
    res = cli.invoke("compare", f"{models_dir}/models.py:tiny", "tiny.onnx", "--input", "x:1x4")
    assert res.exit_code == 0, res.output
    assert "…" not in res.stdout
    assert "PASSED" in res.stdout


# ------------------------------------------------------------------------------------------------------
# huge shapes are refused before allocating, naming the size


def test_run_huge_input_is_refused_naming_the_size(cli, work: Path) -> None:
    cli.error(cli.invoke("run", "tiny_dyn.onnx", "--input", "x:100000x100000"), 2, "37.3 GiB")


def test_bench_huge_batch_is_refused_naming_the_size(cli, work: Path) -> None:
    cli.error(cli.invoke("bench", "tiny_dyn.onnx", "--batch", "100000000000", "--iters", "1"), 2, "GiB")


def test_compare_huge_input_is_refused(cli, work: Path, models_dir: Path) -> None:
    res = cli.invoke("compare", f"{models_dir}/models.py:tiny", "tiny.onnx", "--input", "x:100000x100000x10")
    cli.error(res, 2, "GiB", "memory")


def test_export_huge_input_is_refused(cli, work: Path, models_dir: Path) -> None:
    res = cli.invoke("export", f"{models_dir}/models.py:tiny", "--input", "x:100000x100000x100", "-o", "m.onnx")
    cli.error(res, 2, "GiB")
    assert not (work / "m.onnx").exists()


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.int64, np.bool_])
def test_random_inputs_are_drawn_in_the_model_dtype(dtype: type) -> None:
    from normfold.runtime.base import TensorMeta
    from normfold.runtime.run import random_feeds

    feeds = random_feeds([TensorMeta("x", (2, 3), np.dtype(dtype))], seed=1)
    assert feeds["x"].dtype == np.dtype(dtype) and feeds["x"].shape == (2, 3)


# ------------------------------------------------------------------------------------------------------
# nonsense is refused, never silently accepted


def test_compare_backend_torch_is_refused(cli, work: Path, models_dir: Path) -> None:
    res = cli.invoke("compare", f"{models_dir}/models.py:tiny", "tiny.onnx", "--input", "x:1x4", "--backend", "torch")
    cli.error(res, 2, "eager reference")


def test_gate_unknown_pass_is_a_config_error_at_load(cli, work: Path, models_dir: Path) -> None:
    config = _gate_config(work, models_dir, "exit0", defaults='passes = ["fold_everything"]\n')
    res = cli.invoke("gate", config)
    cli.error(res, 2, "fold_everything")
    assert "sys.exit" not in res.output  # refused at load, before any case ran


def test_seed_with_factory_inputs_is_refused(cli, work: Path, models_dir: Path) -> None:
    res = cli.invoke("compare", f"{models_dir}/models.py:tiny_with_inputs", "tiny.onnx", "--seed", "5")
    cli.error(res, 2, "--seed 5", "own example inputs")


def test_factory_inputs_are_labelled_as_such(cli, work: Path, models_dir: Path) -> None:
    res = cli.invoke("compare", f"{models_dir}/models.py:tiny_with_inputs", "tiny.onnx")
    assert res.exit_code == 0, res.output
    assert "inputs: example inputs from the factory" in res.stdout
    assert "seeded random" not in res.stdout


def test_seed_with_an_inputs_file_is_refused(cli, work: Path) -> None:
    np.savez(work / "in.npz", x=np.ones((1, 4), np.float32))
    cli.error(cli.invoke("run", "tiny.onnx", "--inputs", "in.npz", "--seed", "3"), 2, "--seed 3")


def test_seed_is_honoured_for_random_inputs(cli, work: Path, models_dir: Path) -> None:
    res = cli.invoke("compare", f"{models_dir}/models.py:tiny", "tiny.onnx", "--input", "x:1x4", "--seed", "5")
    assert res.exit_code == 0, res.output
    assert "seeded random (seed 5)" in res.stdout


# ------------------------------------------------------------------------------------------------------
# --json: exactly one JSON object on stdout, also on failure


def test_export_json_failure_is_one_json_object(cli, work: Path, models_dir: Path) -> None:
    res = cli.invoke("export", f"{models_dir}/models.py:exit0", "-o", "m.onnx", "--json")
    cli.error(res, 2, "sys.exit(0)")
    payload = json.loads(res.stdout)
    assert payload["exit_code"] == 2 and "sys.exit(0)" in payload["error"]


def test_export_json_with_a_stdout_dump_is_one_json_object(cli, work: Path, models_dir: Path) -> None:
    res = cli.invoke("export", f"{models_dir}/models.py:prints_then_fails", "-o", "m.onnx", "--json")
    cli.error(res, 2, "export exploded")
    payload = json.loads(res.stdout)  # the dump went to stderr, the error is the one object on stdout
    assert "export exploded" in payload["error"]
    assert "graph(%x" in res.stderr


def test_run_json_failure_is_one_json_object(cli, work: Path) -> None:
    res = cli.invoke("run", "missing.onnx", "--json")
    cli.error(res, 2, "missing.onnx")
    assert json.loads(res.stdout)["exit_code"] == 2


def test_bench_json_stdout_failure_is_one_json_object(cli, work: Path) -> None:
    res = cli.invoke("bench", "tiny.onnx", "--backend", "nosuch", "--json", "-")
    cli.error(res, 2, "nosuch")
    assert json.loads(res.stdout)["exit_code"] == 2


def test_compare_json_success_is_one_json_object(cli, work: Path, models_dir: Path) -> None:
    res = cli.invoke("compare", f"{models_dir}/models.py:tiny", "tiny.onnx", "--input", "x:1x4", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["passed"] is True


# ------------------------------------------------------------------------------------------------------


def _gate_config(work: Path, models_dir: Path, factory: str, *, extra: str = "", defaults: str = "") -> Path:
    """A one-case gate on the tiny ONNX (no export, no optimize) with reports next to it."""
    path = work / "normfold.toml"
    path.write_text(
        f"{extra}"
        "[defaults]\n"
        "optimize = false\n"
        "per_layer = false\n"
        f"{defaults}"
        "[reports]\n"
        'junit = "out/junit.xml"\n'
        'json = "out/report.json"\n'
        "[[models]]\n"
        f'ref = "{models_dir}/models.py:{factory}"\n'
        'inputs = ["x:1x4"]\n'
        f'onnx = "{work}/tiny.onnx"\n'
    )
    return path
