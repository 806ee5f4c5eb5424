"""Δm% and the seed summaries the recipes report."""

from __future__ import annotations

import pytest

from lightning_mtl.evaluation import delta_m, delta_m_line, format_table, mean_std, per_task

DIRECTIONS = {
    "death": {"auroc": True, "auprc": True, "brier": False},
    "length_of_stay": {"mae": False, "rmse": False},
}


def test_delta_m_per_task_mean_and_flat_mean_with_directions():
    stl = {
        "death": {"auroc": 0.80, "auprc": 0.50, "brier": 0.20},
        "length_of_stay": {"mae": 10.0, "rmse": 20.0},
    }
    mtl = {
        "death": {"auroc": 0.88, "auprc": 0.50, "brier": 0.20},
        "length_of_stay": {"mae": 11.0, "rmse": 20.0},
    }
    # death: (+10 + 0 + 0) / 3; stay: (-10 + 0) / 2 (a higher error is worse)
    got = delta_m(mtl, stl, DIRECTIONS)
    assert got == pytest.approx({"per_task_mean": (10 / 3 - 5) / 2, "flat_mean": 0.0})
    # a lower Brier score is better: +50 % on that metric
    better = {**mtl, "death": {**mtl["death"], "brier": 0.10}}
    assert delta_m(better, stl, DIRECTIONS)["flat_mean"] == pytest.approx(50 / 5)
    # only the metrics named are compared (extra ones such as a loss are ignored)
    noisy = {k: {**v, "loss": 9.0} for k, v in mtl.items()}
    assert delta_m(noisy, stl, DIRECTIONS) == got


def test_delta_m_names_what_is_missing_or_undefined():
    scores = {"death": {"auroc": 0.8, "auprc": 0.5, "brier": 0.2}}
    with pytest.raises(KeyError, match="'length_of_stay' is missing from the mtl"):
        delta_m(scores, scores, DIRECTIONS)
    zero = {"death": {"auroc": 0.8, "auprc": 0.5, "brier": 0.0}}
    with pytest.raises(ValueError, match="single-task death/brier is 0"):
        delta_m(scores, zero, {"death": DIRECTIONS["death"]})


def test_mean_std_uses_the_sample_deviation():
    assert mean_std([2.0]) == {"mean": 2.0, "std": 0.0}
    got = mean_std([1.0, 2.0, 4.0])
    assert got["mean"] == pytest.approx(7 / 3)
    assert got["std"] == pytest.approx(
        ((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) ** 0.5 / 2**0.5
    )
    with pytest.raises(ValueError, match="no values"):
        mean_std([])


def test_per_task_and_tables():
    logged = {"test/a/accuracy": 0.5, "test/b/mae": 2, "val/a/accuracy": 0.1, "test/loss": 3.0}
    assert per_task(logged, "test") == {"a": {"accuracy": 0.5}, "b": {"mae": 2.0}}
    table = format_table([["task", "accuracy"], ["top_left", "0.9"]]).splitlines()
    assert table[0] == "task     | accuracy" and table[1] == "---------+---------"
    assert table[2] == "top_left | 0.9"
    line = delta_m_line(
        {"per_task_mean": {"mean": -1.234, "std": 0.5}, "flat_mean": {"mean": 2.0, "std": 0.25}}
    )
    assert "-1.23 ± 0.50" in line and "+2.00 ± 0.25" in line
