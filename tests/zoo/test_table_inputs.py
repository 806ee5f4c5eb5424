"""Raw table rows in, predictions out: ``module.predict`` on a dict, a list of dicts or a DataFrame for a
backbone whose ``preprocess`` reads rows, and ``lightning-mtl predict <model> rows.csv`` for such a model
(the committed ``clinical-risk-los`` entry included): one-line errors name the column."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import isolate_zoo

from lightning_mtl import MultiTaskModule, Task, cli, zoo
from lightning_mtl.backbones import MLPBackbone, TabularMLP
from lightning_mtl.hub import save_pretrained
from lightning_mtl.tabular import TabularPipeline

TASKS = [
    Task("risk", kind="binary", labels=["low", "high"]),
    Task("stay", kind="regression", target_transform="log1p"),
]
TRAIN = pd.DataFrame({"age": [40.0, 60.0, np.nan, 80.0], "sex": ["f", "m", "m", None]})
ROWS = [{"age": 55.0, "sex": "f"}, {"age": None, "sex": "x"}, {"age": 90.0, "sex": None}]


@pytest.fixture(scope="module")
def model() -> MultiTaskModule:
    torch.manual_seed(0)
    return MultiTaskModule(TabularMLP(TabularPipeline.fit(TRAIN), hidden=(8,)), TASKS).eval()


def test_predict_takes_rows_in_every_form(model):
    expected = model.predict(model.backbone.preprocess(ROWS))
    assert model.predict(ROWS) == expected
    assert model.predict(pd.DataFrame(ROWS)) == expected
    assert model.predict(pd.DataFrame(ROWS), batch_size=2) == expected
    one = model.predict(ROWS[0])
    assert one["risk"] == expected["risk"][:1] and one["stay"] == expected["stay"][:1]


def test_predict_still_takes_tensors_and_refuses_rows_without_preprocess(model):
    assert model.predict(dict(model.backbone.preprocess(ROWS))) == model.predict(ROWS)
    plain = MultiTaskModule(MLPBackbone(2, hidden=(4,)), TASKS)
    with pytest.raises(TypeError, match="predict\\(\\) takes text, a tensor or a dict of tensors, got dict"):
        plain.predict({"age": 1.0, "sex": "f"})


def test_row_errors_name_the_column(model):
    with pytest.raises(ValueError, match=r"lacks input column\(s\) \['sex'\]"):
        model.predict({"age": 50.0})


@pytest.fixture
def table_zoo(model, tmp_path, monkeypatch):
    root = tmp_path / "zoo"
    save_pretrained(model, root / "tiny-table", card={"license": "apache-2.0"})
    isolate_zoo(monkeypatch, root)
    return root


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_predicts_csv_rows(model, table_zoo, capsys, tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("id,age,sex\n1,55,f\n2,,x\n3,90,\n")  # an extra column, empty cells, an unseen category
    code, out, err = run(capsys, "predict", "tiny-table", path, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["inputs"] == ["row 1", "row 2", "row 3"]
    assert result["predictions"] == json.loads(json.dumps(model.predict(ROWS)))
    code, out, _ = run(capsys, "predict", "tiny-table", path)
    assert code == 0 and len(out.splitlines()) == 5  # header, rule, 3 rows


@pytest.mark.parametrize(
    ("csv", "fragments"),
    [
        ("age\n50\n", ["lack input column(s) ['sex']"]),
        ("age,sex\n50,f\nold,m\n", ["column 'age' is numeric, but row 2 holds 'old'"]),
    ],
)
def test_cli_row_errors_are_one_line_naming_the_column(table_zoo, capsys, tmp_path, csv, fragments):
    path = tmp_path / "rows.csv"
    path.write_text(csv)
    code, out, err = run(capsys, "predict", "tiny-table", path)
    assert code == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert all(f in err for f in fragments), err


def test_cli_tells_a_table_model_user_to_pass_a_csv(table_zoo, capsys):
    code, _, err = run(capsys, "predict", "tiny-table", "age 50, female")
    assert code == 2 and "does not take text" in err and "CSV" in err


# --- the committed clinical entry ------------------------------------------------------------------------
def support2_rows(n: int) -> pd.DataFrame:
    from lightning_mtl.data.support2 import support2

    return support2().iloc[:n]


@pytest.mark.skipif("clinical-risk-los" not in zoo.list_models(), reason="no clinical-risk-los entry in zoo/")
def test_clinical_entry_predicts_a_record_a_frame_and_a_csv(capsys, tmp_path):
    model = zoo.load("clinical-risk-los")
    frame = support2_rows(3)
    record = {**frame.iloc[0].to_dict(), "alb": None, "income": ""}  # unknown values are imputed
    for predictions, n in ((model.predict(frame), 3), (model.predict(record), 1)):
        assert list(predictions) == ["diabetes", "death", "length_of_stay"]
        for task in ("diabetes", "death"):
            assert all(
                math.isclose(sum(p["probabilities"].values()), 1.0, rel_tol=1e-6) for p in predictions[task]
            )
        assert len(predictions["length_of_stay"]) == n
        assert all(2.0 < p["value"] < 120.0 for p in predictions["length_of_stay"])  # days
    path = tmp_path / "patients.csv"
    frame.to_csv(path, index=False)  # the full records, outcomes and all: unknown columns are ignored
    code, out, err = run(capsys, "predict", "clinical-risk-los", path, "--json")
    assert code == 0, err
    assert json.loads(out)["predictions"] == json.loads(json.dumps(model.predict(frame)))
