"""The clinical recipe: its fast mode end to end (all three model families, Δm%, results.json, a zoo entry
that predicts raw records), its definitions, and the committed zoo entry."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from conftest import load_script

from lightning_mtl import MultiTaskModule, zoo
from lightning_mtl.data.support2 import support2
from lightning_mtl.evaluation import delta_m

RECIPE = Path(__file__).parents[2] / "recipes" / "clinical_risk_los.py"
TASKS = ["diabetes", "death", "length_of_stay"]
METRICS = {
    "diabetes": {"auroc", "auprc", "brier"},
    "death": {"auroc", "auprc", "brier"},
    "length_of_stay": {"mae", "rmse"},
}


@pytest.fixture(scope="module")
def recipe():
    return load_script(RECIPE)


def raw_rows(n: int = 3) -> pd.DataFrame:
    """Full SUPPORT2 records (inputs, outcomes, ids), as a user's CSV would hold them."""
    return support2().iloc[:n]


def check_predictions(predictions: dict, n: int) -> None:
    assert list(predictions) == TASKS
    for task in ("diabetes", "death"):
        for p in predictions[task]:
            assert 0.0 <= p["probabilities"][p["label"]] <= 1.0
            assert math.isclose(sum(p["probabilities"].values()), 1.0, rel_tol=1e-6)
        assert len(predictions[task]) == n
    stays = [p["value"] for p in predictions["length_of_stay"]]
    assert len(stays) == n and all(2.0 < s < 120.0 for s in stays)  # days, not log-days


@pytest.mark.slow
def test_recipe_fast_mode(recipe, tmp_path):
    out, zoo_dir = tmp_path / "out", tmp_path / "zoo"
    result = recipe.main(["--fast", f"--output_dir={out}", f"--zoo_dir={zoo_dir}"])
    assert result["seeds"] == [0]
    run = result["runs"][0]
    assert run["sizes"] == {"train": 420, "val": 60, "test": 120}  # --fast keeps 600 patients, 70/10/20
    for family in ("multi-task", "single-task", "gradient boosting"):
        assert {t: set(m) for t, m in run["test"][family].items()} == METRICS, family
    assert run["timing"]["multi-task"]["epochs"] <= 3
    assert 1 <= run["timing"]["gradient boosting"]["death"]["trees"] <= 10
    # Δm% is recomputed from the per-task metrics, and the summary carries it with the paired differences
    mtl, stl = run["test"]["multi-task"], run["test"]["single-task"]
    assert run["delta_m"] == delta_m(mtl, stl, recipe.higher_is_better(list(mtl)))
    assert result["delta_m_percent"]["per_task_mean"]["mean"] == pytest.approx(
        run["delta_m"]["per_task_mean"]
    )
    gap = run["test"]["multi-task"]["death"]["auroc"] - run["test"]["gradient boosting"]["death"]["auroc"]
    assert result["targets"]["death_auroc_minus_gradient_boosting"] == pytest.approx(gap)
    saved = json.loads((out / "results.json").read_text())
    assert saved["runs"][0]["test"] == run["test"] and saved["command"].endswith(
        "--fast " + f"--output_dir={out} --zoo_dir={zoo_dir}"
    )
    assert "pipeline" not in saved["model"]  # the fitted state lives in the artifact, not in the results
    assert (out / "config.yaml").is_file()

    # the exported entry: valid, its card carries the command and the numbers, it predicts raw records
    entry = zoo_dir / "clinical-risk-los"
    assert zoo.validate_entry(entry) == []
    config = json.loads((entry / "config.json").read_text())
    for task, metrics in run["test"]["multi-task"].items():
        assert config["metrics"][task] == pytest.approx(metrics)
    assert config["card"]["recipe"]["command"] == result["command"]
    assert "death/auroc" in config["card"]["recipe"]["test_mean_std_over_seeds"]["gradient boosting"]
    assert "python recipes/clinical_risk_los.py --fast" in (entry / "README.md").read_text()
    model = zoo.load(entry)
    rows = raw_rows()
    predictions = model.predict(model.backbone.preprocess(rows))
    check_predictions(predictions, 3)
    # ...the same as the checkpoint of the run (best validation epoch), reloaded without pickle
    ckpt = MultiTaskModule.load_from_checkpoint(out / "model.ckpt", weights_only=True)
    assert ckpt.predict(ckpt.backbone.preprocess(rows)) == predictions


def test_delta_m_directions(recipe):
    """Higher is better for AUROC/AUPRC, lower for Brier score and the errors in days."""
    assert recipe.higher_is_better(["death", "length_of_stay"]) == {
        "death": {"auroc": True, "auprc": True, "brier": False},
        "length_of_stay": {"mae": False, "rmse": False},
    }


def test_targets_flag_a_task_worse_beyond_seed_noise(recipe):
    def runs(deltas):
        out = []
        for i, d in enumerate(deltas):
            stl = {"auroc": 0.85 + 0.01 * (i - 2), "auprc": 0.7, "brier": 0.13}  # std over seeds 0.0158
            death = {**stl, "auroc": stl["auroc"] + d}
            out.append(
                {
                    "test": {
                        "multi-task": {"death": death},
                        "single-task": {"death": stl},
                        "gradient boosting": {"death": {**stl, "auroc": 0.86}},
                    },
                    "delta_m": {"per_task_mean": 0.0, "flat_mean": 0.0},
                }
            )
        return out

    noisy = recipe.summarise(runs([-0.02, 0.02, -0.01, 0.01, -0.005]))
    verdict = recipe.check_targets(noisy, 5)
    assert verdict["multi_task_not_worse_than_single_task"] and verdict["worse_paired"] == []
    # consistently 0.02 worse: beyond the paired noise and beyond the single-task spread over seeds
    worse = recipe.summarise(runs([-0.02, -0.021, -0.019, -0.02, -0.022]))
    verdict = recipe.check_targets(worse, 5)
    assert verdict["worse_paired"] == verdict["worse_than_seed_spread"] == ["death/auroc"]
    assert verdict["multi_task_not_worse_than_single_task"] is False
    assert verdict["death_auroc_within_0.01_of_gradient_boosting"] is False
    assert "death" in recipe.results_table(worse) and "Δm%" in recipe.results_table(worse)


def test_recipe_help_lists_overrides(recipe, capsys):
    with pytest.raises(SystemExit):
        recipe.main(["--help"])
    text = capsys.readouterr().out
    for flag in (
        "--seeds",
        "--trainer.max_epochs",
        "--trainer.devices",
        "--model.balancer",
        "--model.hidden",
        "--data.scores",
        "--validation.patience",
        "--hgb_max_iter",
        "--zoo_dir",
    ):
        assert flag in text


def test_committed_entry_predicts_raw_records():
    model = zoo.load("clinical-risk-los")
    assert model.backbone.pipeline.columns[:3] == ["age", "edu", "hday"]
    rows = raw_rows(4)
    check_predictions(model.predict(model.backbone.preprocess(rows)), 4)
    # one record as a dict with unknown labs left empty
    record = {**rows.iloc[0].to_dict(), "alb": None, "pafi": "", "income": None}
    check_predictions(model.predict(model.backbone.preprocess(record)), 1)
    info = zoo.describe("clinical-risk-los")
    assert info["recipe"]["command"].startswith("python recipes/clinical_risk_los.py")
    assert set(info["metrics"]) == set(TASKS)
