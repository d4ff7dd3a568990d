"""Gather/GatherElements of constant indices from a constant table folded to the rows (BERT's embeddings)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from fold_helpers import make_model, ops, run_ort, vi
from onnx import TensorProto, helper

from normfold.fusers import optimize
from normfold.fusers.gather import MAX_GROWTH

RNG = np.random.default_rng(0)
POS = RNG.standard_normal((32, 4)).astype(np.float32)  # a position table, 32 positions of width 4
IDS = np.arange(8, dtype=np.int64).reshape(1, 8)


def _embeddings(table: np.ndarray, ids: np.ndarray | None, op: str = "Gather", axis: int = 0) -> onnx.ModelProto:
    """``x + op(table, ids)``; ``ids`` None makes the ids a graph input (a real lookup)."""
    inits = {"T": table} | ({"ids": ids} if ids is not None else {})
    shape = [*IDS.shape, *table.shape[1:]] if op == "Gather" else list(IDS.shape)
    inputs = [vi("x", shape)] + ([vi("ids", list(IDS.shape), TensorProto.INT64)] if ids is None else [])
    nodes = [helper.make_node(op, ["T", "ids"], ["e"], axis=axis), helper.make_node("Add", ["x", "e"], ["y"])]
    return make_model(nodes, inputs, [vi("y", shape)], inits)


@pytest.mark.parametrize(
    ("table", "ids", "op", "axis"),
    [
        (POS, IDS, "Gather", 0),
        (POS, IDS - 8, "Gather", 0),  # negative indices count from the end
        (RNG.standard_normal((1, 40)).astype(np.float32), IDS[:, ::-1].copy(), "GatherElements", 1),
    ],
    ids=["positions", "negative-ids", "gather-elements-axis1"],
)
def test_constant_lookup_folds_to_its_rows(
    table: np.ndarray, ids: np.ndarray, op: str, axis: int, tmp_path: Path
) -> None:
    model = _embeddings(table, ids, op, axis)
    report = optimize(model, tmp_path / "o.onnx", passes=["fold_constant_gather"])
    assert report.rules["fold_constant_gather"].applied == 1
    assert ops(tmp_path / "o.onnx") == {"Add": 1}
    x = RNG.standard_normal([d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]).astype(np.float32)
    (want,) = run_ort(model, {"x": x})
    (got,) = run_ort(tmp_path / "o.onnx", {"x": x})
    np.testing.assert_array_equal(got, want)  # a selection: bit-exact
    assert report.initializer_bytes_after < report.initializer_bytes_before  # the 32-row table is gone


def test_real_lookup_and_large_growth_are_kept(tmp_path: Path) -> None:
    report = optimize(_embeddings(POS, None), tmp_path / "a.onnx", passes=["fold_constant_gather"])
    assert report.rules["fold_constant_gather"].matched == 0  # token ids at run time: no candidate
    big = np.zeros((2, MAX_GROWTH // 4), dtype=np.float32)  # 8 picked rows of 2 grow the model by 1.5×limit
    model = _embeddings(big, np.zeros((1, 8), dtype=np.int64))
    report = optimize(model, passes=["fold_constant_gather"], verify=False)
    (event,) = report.rules["fold_constant_gather"].events
    assert event.status == "skipped" and f"(limit {MAX_GROWTH})" in event.reason


def test_out_of_range_ids_are_refused(tmp_path: Path) -> None:
    report = optimize(_embeddings(POS, IDS + 30), passes=["fold_constant_gather"], verify=False)
    (event,) = report.rules["fold_constant_gather"].events
    assert event.status == "skipped" and "out of range for axis size 32" in event.reason
