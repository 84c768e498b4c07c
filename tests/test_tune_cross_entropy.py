"""bench.tune_cross_entropy: its choice rule, its budget, and a --smoke run whose table the kernels' parser reads."""

import json

import pytest

from bench import common, tune_cross_entropy
from kernels import cross_entropy

DEFAULT = tune_cross_entropy.CANDIDATES[0]


def _rows(ms_by_launch, shapes=("a", "b"), size=2):
    """Measured rows: {launch: (ms on shape a, ms on shape b)}."""
    return [{"shape": shape, "element_size": size, "num_warps": launch[0], "unroll": launch[1], "status": "ok",
             "ms": ms[i]} for launch, ms in ms_by_launch.items() for i, shape in enumerate(shapes)]


def test_choose_takes_the_best_geomean_that_loses_nowhere():
    rows = _rows({DEFAULT: (1.0, 1.0), (8, 4): (0.90, 0.95), (16, 4): (0.80, 1.02), (32, 1): (0.85, 0.90)})
    (launch, geo, per_shape), = tune_cross_entropy.choose(rows, smoke=False).values()
    assert launch == (32, 1)  # (16, 4) has the best geomean but is 2% slower on shape b
    assert per_shape == pytest.approx({"a": 1 / 0.85, "b": 1 / 0.90}) and geo == pytest.approx((1 / 0.765) ** 0.5)


def test_choose_keeps_the_default_below_the_minimum_gain():
    rows = _rows({DEFAULT: (1.0, 1.0), (8, 4): (0.99, 0.98)})
    rows += [{"shape": "a", "element_size": 4, "num_warps": 16, "unroll": 1, "status": "ok", "ms": 1.0},
             {"shape": "a", "element_size": 4, "num_warps": 8, "unroll": 4, "status": "rejected"}]
    assert tune_cross_entropy.choose(rows, smoke=False) == {}


def test_budget_stops_cleanly():
    rows = tune_cross_entropy.measure_shape(tune_cross_entropy.SMOKE_SHAPES[0], "cpu", True, common.Deadline(1e-9))
    assert len(rows) == len(tune_cross_entropy.CANDIDATES) and all(r["status"] == "not run" for r in rows)
    data = tune_cross_entropy.table(rows, tune_cross_entropy.choose(rows, True), common.environment(True), True)
    assert data["entries"] == [] and "not run" in tune_cross_entropy.markdown(data, {})


def test_smoke_run_writes_a_table_the_kernels_accept(tmp_path):
    tune_cross_entropy.main(["--smoke", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "cross_entropy_tuned.json").read_text())
    assert data["smoke"] is True and data["environment"]["commit"]
    # every candidate runs, but a row read once where the row is shorter than its block (it would stream)
    streams = [r for r in data["rows"] if r["status"] != "ok"]
    assert all(r["unroll"] == "row" and "shorter than one block" in r["reason"] for r in streams), streams
    assert any(r["unroll"] == "row" and r["status"] == "ok" for r in data["rows"])
    table = cross_entropy.parse_tuned_table(data)  # the format the kernels read
    assert set(table) == {(9, 2), (9, 4)}  # --smoke writes an entry per element size
    with pytest.raises(ValueError, match="--smoke"):  # and that kernels/ refuses to load
        cross_entropy.load_tuned_table(str(tmp_path / "cross_entropy_tuned.json"))
    md = (tmp_path / "cross_entropy_tuned.md").read_text()
    for text in ("SMOKE", "Chosen", "| linear CE chunk |", "| fp32 logits |"):
        assert text in md, text
