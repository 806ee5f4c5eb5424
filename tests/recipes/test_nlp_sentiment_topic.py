"""The NLP recipe in its fast mode, on a small slice, with a tiny random encoder folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_script

from lightning_mtl import MultiTaskModule

RECIPE = Path(__file__).parents[2] / "recipes" / "nlp_sentiment_topic.py"


@pytest.mark.slow
def test_recipe_fast_mode(tmp_path, tiny_bert_dir):
    recipe = load_script(RECIPE)
    out = tmp_path / "out"
    summary = recipe.main(
        [
            "--fast",
            f"--model.model_name_or_path={tiny_bert_dir}",
            "--model.freeze_layers=1",
            f"--output_dir={out}",
            f"--zoo_dir={tmp_path / 'zoo'}",
        ]
    )
    assert set(summary["test"]) == {"sentiment", "topic"}
    assert {"accuracy", "f1", "auroc", "loss"} <= set(summary["test"]["sentiment"])
    assert {"accuracy", "macro_f1", "loss"} <= set(summary["test"]["topic"])
    assert summary["train_sizes"] == {
        "sentiment": 76,
        "topic": 76,
    }  # --fast keeps 96 per task: 96 - 10 val - 10 test
    saved = json.loads((out / "results.json").read_text())
    assert saved["test"] == summary["test"]
    assert (out / "config.yaml").read_text().count("model_name_or_path") == 1
    # the saved model reloads without pickle and predicts both tasks with label names
    model = MultiTaskModule.load_from_checkpoint(out / "model.ckpt", weights_only=True)
    preds = model.predict(["a tedious, joyless film about the stock market"])
    assert preds["sentiment"][0]["label"] in {"rotten", "fresh"}
    assert set(preds["topic"][0]["probabilities"]) == {
        "business",
        "entertainment",
        "politics",
        "sport",
        "tech",
    }
    torch.load(out / "model.ckpt", weights_only=True)
    # the exported zoo entry stores only the trained tensors, references its base, and predicts the same
    entry = tmp_path / "zoo" / "nlp-sentiment-topic"
    config = json.loads((entry / "config.json").read_text())
    assert config["base"]["ref"] == str(tiny_bert_dir)
    assert config["metrics"]["topic"]["accuracy"] == pytest.approx(summary["test"]["topic"]["accuracy"])
    assert not any(name.startswith("backbone.model.embeddings") for name in config["weights"]["tensors"])
    reloaded = MultiTaskModule.from_pretrained(entry)
    text = ["a tedious, joyless film about the stock market"]
    assert reloaded.predict(text) == model.predict(text)


def test_recipe_help_lists_overrides(capsys):
    recipe = load_script(RECIPE)
    with pytest.raises(SystemExit):
        recipe.main(["--help"])
    text = capsys.readouterr().out
    for flag in (
        "--trainer.devices",
        "--trainer.precision",
        "--trainer.max_epochs",
        "--model.model_name_or_path",
        "--model.balancer",
        "--data.sentiment_source",
    ):
        assert flag in text


@pytest.mark.slow
@pytest.mark.multiprocess
def test_recipe_fast_mode_under_ddp(tmp_path, tiny_bert_dir):
    """`--trainer.devices 2 --trainer.strategy ddp`: the Trainer flags are all a user changes; here with a
    gradient-aggregation balancer chosen from the command line."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [
        sys.executable,
        str(RECIPE),
        "--fast",
        f"--model.model_name_or_path={tiny_bert_dir}",
        "--model.freeze_layers=1",
        '--model.balancer={"name": "pcgrad", "mode": "params"}',
    ]
    args += ["--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.accelerator=cpu"]
    args += [f"--output_dir={tmp_path / 'out'}", f"--zoo_dir={tmp_path / 'zoo'}"]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert summary["trainer"]["devices"] == 2
    assert set(summary["test"]) == {"sentiment", "topic"}
    assert (tmp_path / "zoo" / "nlp-sentiment-topic" / "model.safetensors").is_file()
    loaded = MultiTaskModule.load_from_checkpoint(tmp_path / "out" / "model.ckpt", weights_only=True)
    assert type(loaded.balancer).__name__ == "PCGrad" and loaded.balancer.mode == "params"
