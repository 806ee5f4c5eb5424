"""The table pipeline: statistics from the training rows only, imputation with missingness flags, categorical
ids (missing, unseen), the row formats it takes, the errors it gives, and its JSON state."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from lightning_mtl.tabular import CategoricalColumn, NumericColumn, TabularInputError, TabularPipeline

TRAIN = pd.DataFrame(
    {
        "age": [30.0, 50.0, 70.0, np.nan, 90.0],
        "temp": [36.0, 37.0, 38.0, 39.0, 40.0],
        "bili": [0.1, 0.2, 0.3, 0.5, 40.0],  # right-skewed, non-negative
        "sex": ["f", "m", "m", None, "f"],
        "ca": ["no", "yes", "metastatic", "no", "no"],
        "outcome": [0, 1, 0, 1, 0],  # not an input
    }
)
NUMERIC, CATEGORICAL = ["age", "temp", "bili"], ["sex", "ca"]
ROW = {"age": 50.0, "temp": 38.0, "bili": 0.3, "sex": "m", "ca": "yes"}


@pytest.fixture
def pipe() -> TabularPipeline:
    return TabularPipeline.fit(TRAIN, NUMERIC, CATEGORICAL)


def test_fit_infers_column_types_from_dtypes():
    inferred = TabularPipeline.fit(TRAIN.drop(columns=["outcome"]))
    assert [c.name for c in inferred.numeric] == NUMERIC
    assert [c.name for c in inferred.categorical] == CATEGORICAL


def test_statistics_come_from_the_training_rows(pipe):
    age, temp, bili = pipe.numeric
    assert (age.median, age.mean) == (60.0, 60.0)  # the observed training values 30, 50, 70, 90
    assert age.std == pytest.approx(np.std([30.0, 50.0, 70.0, 90.0]))
    assert age.indicator and not temp.indicator  # a flag only where training had missing values
    assert bili.log and not age.log and not temp.log
    # other rows are scaled with the training statistics, not their own
    other = pipe.transform(pd.DataFrame([{**ROW, "age": 60.0, "temp": 38.0}] * 3))
    assert other["numeric"][:, pipe.feature_names.index("age")].tolist() == [0.0] * 3
    assert other["numeric"][:, pipe.feature_names.index("temp")].tolist() == [0.0] * 3


def test_standardised_training_values(pipe):
    out = pipe.transform(TRAIN)["numeric"]
    temp = out[:, pipe.feature_names.index("temp")]
    assert temp.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert temp.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    bili = out[:, pipe.feature_names.index("bili")]
    expected = np.log1p(TRAIN["bili"].to_numpy())
    assert bili.numpy() == pytest.approx((expected - expected.mean()) / expected.std(), abs=1e-5)


def test_the_whole_table_path_matches_each_column_and_the_text_path(pipe):
    frame = pd.concat([TRAIN, pd.DataFrame([{**ROW, "age": 200.0, "bili": None}])], ignore_index=True)
    out = pipe.transform(frame)["numeric"].numpy()
    names = pipe.feature_names
    for column in pipe.numeric:
        each = column.encode(frame[column.name])
        assert out[:, names.index(column.name)] == pytest.approx(each[:, 0])
        if column.indicator:
            assert out[:, names.index(f"{column.name}__missing")].tolist() == each[:, 1].tolist()
    as_text = frame.astype("object").where(frame.notna(), "")  # every cell a string or "", as typed by hand
    as_text[NUMERIC] = as_text[NUMERIC].map(str)
    assert pipe.transform(as_text)["numeric"].numpy() == pytest.approx(out)


def test_clip_bounds_the_standardised_values():
    pipe = TabularPipeline.fit(TRAIN, ["temp"], [], clip=1.0)
    assert pipe.transform({"temp": 1000.0})["numeric"].tolist() == [[1.0]]
    unclipped = TabularPipeline.fit(TRAIN, ["temp"], [], clip=None)
    assert unclipped.transform({"temp": 1000.0})["numeric"].item() > 100


@pytest.mark.parametrize("empty", [None, np.nan, float("nan"), "", "  "])
def test_missing_numeric_takes_the_median_and_sets_its_flag(pipe, empty):
    out = pipe.transform({**ROW, "age": empty, "temp": empty})["numeric"][0]
    names = pipe.feature_names
    assert names == ["age", "temp", "bili", "age__missing"]
    assert out[names.index("age")].item() == 0.0  # the median 60 is also the mean
    assert out[names.index("age__missing")].item() == 1.0
    # temp had no missing values in training: imputed, but it has no flag
    assert "temp__missing" not in names
    assert out[names.index("temp")].item() == pytest.approx(0.0)  # median 38 == mean 38
    present = pipe.transform(ROW)["numeric"][0]
    assert present[names.index("age__missing")].item() == 0.0


def test_categorical_ids_missing_unknown_and_known(pipe):
    sex = pipe.categorical[0]
    assert sex.categories == ["f", "m"] and sex.cardinality == 4
    rows = [{**ROW, "sex": v} for v in ("f", "m", None, "", "x", np.nan)]
    assert pipe.transform(rows)["categorical"][:, 0].tolist() == [
        2,
        3,
        CategoricalColumn.MISSING,
        CategoricalColumn.MISSING,
        CategoricalColumn.UNKNOWN,
        CategoricalColumn.MISSING,
    ]


def test_numbers_as_categories_match_their_text():
    col = CategoricalColumn.fit("grade", pd.Series(["1", "2", "3"]))
    assert col.encode(pd.Series([1, 2.0, "3", 4, True])).tolist() == [2, 3, 4, 1, 1]


def test_every_row_format_gives_the_same_tensors(pipe):
    frame = pd.DataFrame([ROW, {**ROW, "sex": "f"}])
    expected = pipe.transform(frame)
    assert expected["numeric"].dtype == torch.float32 and expected["categorical"].dtype == torch.long
    assert expected["numeric"].shape == (2, pipe.numeric_width) == (2, 4)
    assert expected["categorical"].shape == (2, 2)
    for rows in ([ROW, {**ROW, "sex": "f"}], frame.set_index(pd.Index([17, 3]))):
        got = pipe.transform(rows)
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    one = pipe.transform(ROW)
    assert torch.equal(one["numeric"], expected["numeric"][:1])
    assert torch.equal(pipe.transform(frame.iloc[0])["categorical"], expected["categorical"][:1])


def test_unknown_columns_are_ignored(pipe):
    full = {**ROW, "outcome": 1, "notes": "anything"}
    assert torch.equal(pipe.transform(full)["numeric"], pipe.transform(ROW)["numeric"])


def test_numeric_text_is_parsed(pipe):
    assert torch.equal(
        pipe.transform({**ROW, "age": "50", "temp": " 38.0 "})["numeric"], pipe.transform(ROW)["numeric"]
    )


# --- errors -----------------------------------------------------------------------------------------
def test_a_row_without_a_column_names_it(pipe):
    row = {k: v for k, v in ROW.items() if k != "temp"}
    with pytest.raises(
        TabularInputError, match=r"the row lacks input column\(s\) \['temp'\]; the model takes"
    ):
        pipe.transform(row)
    with pytest.raises(TabularInputError, match=r"row 2 lacks input column\(s\) \['temp', 'ca'\]"):
        pipe.transform([ROW, {k: v for k, v in row.items() if k != "ca"}])
    with pytest.raises(TabularInputError, match=r"the rows lack input column\(s\) \['sex'\]"):
        pipe.transform(pd.DataFrame([ROW]).drop(columns=["sex"]))


def test_a_word_in_a_numeric_column_names_column_row_and_value(pipe):
    with pytest.raises(TabularInputError, match=r"column 'age' is numeric, but row 2 holds 'sixty' \(str\)"):
        pipe.transform([ROW, {**ROW, "age": "sixty"}])


def test_infinite_and_non_scalar_values_are_refused(pipe):
    with pytest.raises(TabularInputError, match=r"column 'temp': row 1 holds inf, which is not finite"):
        pipe.transform({**ROW, "temp": float("inf")})
    with pytest.raises(TabularInputError, match=r"column 'sex' is categorical, but row 1 holds a list"):
        pipe.transform({**ROW, "sex": ["m"]})


@pytest.mark.parametrize("rows", [[], "age=50", 42, [ROW, "x"]])
def test_inputs_that_are_not_rows(pipe, rows):
    with pytest.raises(TabularInputError, match=r"expected a DataFrame|each row is a dict"):
        pipe.transform(rows)


def test_fit_errors():
    with pytest.raises(TabularInputError, match=r"column 'empty' has no values in the training rows"):
        TabularPipeline.fit(pd.DataFrame({"empty": [np.nan, np.nan]}))
    with pytest.raises(TabularInputError, match=r"the training frame lacks column\(s\) \['nope'\]"):
        TabularPipeline.fit(TRAIN, ["age", "nope"])
    with pytest.raises(ValueError, match="at least one"):
        TabularPipeline.fit(TRAIN, [], [])


# --- state --------------------------------------------------------------------------------------------
def test_state_is_json_and_rebuilds_the_same_transform(pipe):
    state = json.loads(json.dumps(pipe.to_dict(), allow_nan=False))
    again = TabularPipeline.from_dict(state)
    rows = [ROW, {**ROW, "age": None, "sex": "other"}]
    assert all(
        torch.equal(again.transform(rows)[k], pipe.transform(rows)[k]) for k in ("numeric", "categorical")
    )
    assert again.to_dict() == pipe.to_dict()
    assert TabularPipeline.coerce(state).columns == pipe.columns


def test_state_from_a_newer_library_or_with_unknown_keys_is_refused(pipe):
    with pytest.raises(ValueError, match="newer than this lightning-mtl reads"):
        TabularPipeline.from_dict({**pipe.to_dict(), "version": 99})
    with pytest.raises(ValueError, match=r"unknown keys \['scaler'\]"):
        TabularPipeline.from_dict({**pipe.to_dict(), "scaler": "robust"})
    with pytest.raises(ValueError, match="expected a NumericColumn spec"):
        TabularPipeline([{"type": "categorical", "name": "x", "categories": []}])


def test_a_csv_row_with_empty_cells(pipe, tmp_path):
    """What the command line passes on: a CSV read by pandas (empty cells are NaN, text stays text)."""
    path = tmp_path / "rows.csv"
    path.write_text("age,temp,bili,sex,ca,outcome\n,38,0.3,m,yes,1\n50,38,0.3,,unknown-value,0\n")
    out = pipe.transform(pd.read_csv(path))
    names = pipe.feature_names
    assert out["numeric"][:, names.index("age__missing")].tolist() == [1.0, 0.0]
    assert out["categorical"].tolist() == [[3, 4], [CategoricalColumn.MISSING, CategoricalColumn.UNKNOWN]]
    path.write_text("age,bili,sex,ca\n50,0.3,m,yes\n")
    with pytest.raises(TabularInputError, match=r"\['temp'\]"):
        pipe.transform(pd.read_csv(path))


def test_numeric_column_doctest_values():
    col = NumericColumn.fit("x", pd.Series([1.0, 2.0, 3.0]))
    assert col.width == 1 and not col.indicator
    assert col.encode(pd.Series([2.0])).tolist() == [[0.0]]
