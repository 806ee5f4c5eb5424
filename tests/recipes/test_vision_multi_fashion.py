"""The vision recipe: its fast mode end to end (multi-task and single-task models, Δm%, results.json, a
checkpoint and a zoo entry that predicts both items and a class map), its overrides, and the committed
zoo entry on real test canvases."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import load_script

from lightning_mtl import MultiTaskModule, zoo
from lightning_mtl.data import multi_fashion as mf

RECIPE = Path(__file__).parents[2] / "recipes" / "vision_multi_fashion.py"
TASKS = ["top_left", "bottom_right", "segmentation"]
INSTALLED = all((mf.DEFAULT_ROOT / name).is_file() for names in mf._FILES.values() for name in names)
needs_files = pytest.mark.skipif(
    not INSTALLED, reason=f"Fashion-MNIST is not installed ({mf.INSTALL}); .ci/run installs it"
)


@pytest.fixture(scope="module")
def recipe():
    return load_script(RECIPE)


def check_predictions(predictions: dict, n: int, size: int = 28) -> None:
    assert list(predictions) == TASKS
    for task in ("top_left", "bottom_right"):
        assert len(predictions[task]) == n
        for p in predictions[task]:
            assert p["label"] in mf.FASHION_LABELS
            assert set(p["probabilities"]) == set(mf.FASHION_LABELS)
            assert math.isclose(sum(p["probabilities"].values()), 1.0, rel_tol=1e-5)
    masks = torch.tensor([p["mask"] for p in predictions["segmentation"]])
    assert masks.shape == (n, size, size)  # one class per input pixel
    assert set(masks.unique().tolist()) <= {0, 1, 2}


@needs_files
@pytest.mark.slow
def test_recipe_fast_mode(recipe, tmp_path):
    out, zoo_dir = tmp_path / "out", tmp_path / "zoo"
    args = ["--fast", "--workers=2", f"--output_dir={out}", f"--zoo_dir={zoo_dir}"]
    result = recipe.main([*args, f"--data.cache_dir={tmp_path / 'cache'}"])
    assert result["seeds"] == [0] and (result["workers"], result["threads"]) == (2, 1)
    run = result["runs"][0]
    assert run["sizes"] == {"train": 384, "val": 128, "test": 256}
    for model in ("multi-task", "single-task"):
        assert list(run["test"][model]) == TASKS
        assert {"accuracy", "macro_f1", "loss"} <= set(run["test"][model]["top_left"])
        assert {"miou", "pixel_accuracy", "loss"} <= set(run["test"][model]["segmentation"])
    assert set(run["timing"]["single-task"]) == set(TASKS)  # three single-task models were trained
    pids = {run["timing"]["multi-task"]["pid"]} | {t["pid"] for t in run["timing"]["single-task"].values()}
    assert len(pids) == 2  # by two worker processes
    assert run["timing"]["multi-task"]["steps"] == 6  # 384 canvases / 64, one epoch
    # Δm% is recomputed from the metrics it summarises
    mtl, stl = run["test"]["multi-task"], run["test"]["single-task"]
    changes = {
        t: [(mtl[t][m] - stl[t][m]) / stl[t][m] * 100 for m in recipe.METRICS[t]] for t in recipe.METRICS
    }
    per_task = sum(sum(c) / len(c) for c in changes.values()) / 3
    assert run["delta_m"]["per_task_mean"] == pytest.approx(per_task)
    assert result["delta_m_percent"]["per_task_mean"]["mean"] == pytest.approx(per_task)
    saved = json.loads((out / "results.json").read_text())
    assert saved["runs"][0]["test"] == run["test"]
    assert saved["command"] == result["command"] and result["command"].startswith(recipe.COMMAND + " --fast")
    assert "seeds:" in (out / "config.yaml").read_text()

    # the checkpoint reloads without pickle; the zoo entry predicts the same, with label names and a map
    trained = MultiTaskModule.load_from_checkpoint(out / "model.ckpt", weights_only=True)
    entry = zoo_dir / recipe.ENTRY
    config = json.loads((entry / "config.json").read_text())
    assert config["hparams"]["backbone"]["class_path"] == "lightning_mtl.backbones.CNNEncoder"
    assert config["extra"]["image_mode"] == "L" and config["extra"]["image_size"] == [28, 28]
    assert config["metrics"]["top_left"]["accuracy"] == pytest.approx(mtl["top_left"]["accuracy"])
    assert config["card"]["recipe"]["command"] == result["command"]
    assert "multi-task" in config["card"]["recipe"]["test_mean_std_over_seeds"]
    images = mf.multi_fashion("test", limit=4, cache_dir=tmp_path / "cache")[[0, 1, 2, 3]]["image"]
    reloaded = MultiTaskModule.from_pretrained(entry)
    predictions = reloaded.predict(images)
    check_predictions(predictions, 4)
    assert predictions == trained.predict(images)


def test_recipe_help_lists_overrides(recipe, capsys):
    with pytest.raises(SystemExit):
        recipe.main(["--help"])
    text = capsys.readouterr().out
    for flag in (
        "--seeds",
        "--trainer.max_epochs",
        "--trainer.precision",
        "--model.balancer",
        "--model.widths",
        "--data.train_size",
        "--data.cache_dir",
        "--validation.patience",
        "--workers",
    ):
        assert flag in text


def test_unknown_task_names_are_refused(recipe):
    with pytest.raises(ValueError, match=r"subset of \['top_left', 'bottom_right', 'segmentation'\]"):
        recipe.make_tasks(["top_left", "colour"])


@needs_files
@pytest.mark.skipif("vision-multi-fashion" not in zoo.list_models(), reason="the entry is not committed yet")
def test_committed_entry_predicts_test_canvases_as_its_card_says():
    """The committed model, on the first 500 test canvases: its accuracy and mIoU are those of its card
    (measured on all 10,000) within sampling noise, and predictions have the documented shape."""
    model = zoo.load("vision-multi-fashion")
    card = zoo.describe("vision-multi-fashion")["metrics"]
    test = mf.multi_fashion("test", limit=500, cache=False)
    batch = test[list(range(500))]
    predictions = model.predict(batch["image"], batch_size=250)
    check_predictions({k: v[:3] for k, v in predictions.items()}, 3)
    for task in ("top_left", "bottom_right"):
        labels = [mf.FASHION_LABELS.index(p["label"]) for p in predictions[task]]
        accuracy = (torch.tensor(labels) == batch[task]).float().mean().item()
        assert abs(accuracy - card[task]["accuracy"]) < 0.06, task  # 500 draws: sd ~0.02
    masks = torch.tensor([p["mask"] for p in predictions["segmentation"]])
    ious = [
        ((masks == c) & (batch["segmentation"] == c)).sum()
        / ((masks == c) | (batch["segmentation"] == c)).sum()
        for c in range(3)
    ]
    assert abs(float(sum(ious)) / 3 - card["segmentation"]["miou"]) < 0.03
