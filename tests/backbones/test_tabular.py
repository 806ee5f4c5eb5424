"""TabularMLP: embeddings + MLP over the pipeline's tensors; its spec carries the fitted pipeline, so a saved
model rebuilds it and predicts from raw rows."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.backbones import TabularMLP
from lightning_mtl.backbones.tabular import embedding_width
from lightning_mtl.hub import save_pretrained
from lightning_mtl.tabular import TabularPipeline

TRAIN = pd.DataFrame(
    {
        "age": [30.0, 50.0, 70.0, np.nan, 90.0, 40.0],
        "lab": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        "group": list("abcdef"),
        "sex": ["f", "m", "m", None, "f", "m"],
    }
)
ROWS = [
    {"age": 61.0, "lab": 2.5, "group": "c", "sex": "f"},
    {"age": None, "lab": 9.0, "group": "zz", "sex": None},
]
TASKS = [
    Task("risk", kind="binary", labels=["low", "high"]),
    Task("stay", kind="regression", target_transform="log1p"),
]


@pytest.fixture
def backbone() -> TabularMLP:
    torch.manual_seed(0)
    return TabularMLP(TabularPipeline.fit(TRAIN), hidden=(16, 8), dropout=0.0, embedding_dim=3)


def test_embeddings_and_feature_width(backbone):
    assert [e.num_embeddings for e in backbone.embeddings] == [8, 4]  # categories + missing + unknown
    assert [e.embedding_dim for e in backbone.embeddings] == [3, 2]  # capped at 3; ceil(4 / 2)
    assert backbone.mlp.net[0].in_features == backbone.pipeline.numeric_width + 5 == 8
    assert backbone(**backbone.preprocess(ROWS)).shape == (2, backbone.out_features) == (2, 8)
    assert embedding_width(2, 8) == 1 and embedding_width(100, 8) == 8


def test_inputs_of_the_wrong_width_are_refused_with_the_fix(backbone):
    with pytest.raises(
        ValueError, match=r"expects numeric \[batch, 3\] and categorical \[batch, 2\].*preprocess"
    ):
        backbone(torch.zeros(2, 4), torch.zeros(2, 2, dtype=torch.long))


def test_spec_is_json_and_rebuilds_the_same_network(backbone):
    spec = json.loads(json.dumps(backbone.spec(), allow_nan=False))
    assert spec["class_path"] == "lightning_mtl.backbones.TabularMLP"
    assert spec["init_args"]["pipeline"] == backbone.pipeline.to_dict()
    again = TabularMLP(**spec["init_args"])
    again.load_state_dict(backbone.state_dict())
    backbone.eval(), again.eval()
    inputs = backbone.preprocess(ROWS)
    assert torch.equal(again(**again.preprocess(ROWS)), backbone(**inputs))


def test_module_checkpoint_and_artifact_rebuild_the_pipeline(backbone, tmp_path):
    module = MultiTaskModule(backbone, TASKS).eval()
    assert module.hparams["backbone"] == backbone.spec()
    folder = save_pretrained(module, tmp_path / "tab")
    config = json.loads((folder / "config.json").read_text())
    assert config["hparams"]["backbone"]["init_args"]["pipeline"]["categorical"][0]["categories"] == list(
        "abcdef"
    )
    loaded = MultiTaskModule.from_pretrained(folder)
    inputs = loaded.backbone.preprocess(ROWS)
    assert loaded.predict(inputs) == module.predict(module.backbone.preprocess(ROWS))


def test_log_target_is_predicted_in_its_units(backbone):
    """A log1p regression task: the head outputs log1p(days); predictions come back in days."""
    module = MultiTaskModule(backbone, TASKS).eval()
    inputs = backbone.preprocess(ROWS)
    with torch.no_grad():
        raw = module(inputs)["stay"][:, 0]
    values = [p["value"] for p in module.predict(inputs)["stay"]]
    assert values == pytest.approx(torch.expm1(raw).tolist(), rel=1e-6)


def test_trains_with_the_tabular_data_module(tmp_path):
    """A few steps through the Trainer on the module's batches: the heads learn, metrics are in days."""
    import lightning as L

    from lightning_mtl.tabular import TabularDataModule

    rng = np.random.default_rng(0)
    n = 256
    frame = pd.DataFrame({"x": rng.normal(size=n), "c": rng.choice(["a", "b"], n)})
    frame["risk"] = (frame["x"] > 0).astype(int)
    frame["stay"] = np.exp(1.5 + frame["x"] + (frame["c"] == "a")).round(1) + 1
    dm = TabularDataModule(frame, TASKS, batch_size=64, seed=0)
    torch.manual_seed(0)
    module = MultiTaskModule(TabularMLP(dm.pipeline, hidden=(16,), dropout=0.0), TASKS, lr=1e-2)
    trainer = L.Trainer(
        max_epochs=15,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, dm)
    val = trainer.callback_metrics
    assert float(val["val/risk/auroc"]) > 0.9
    # MAE is in the target's units (days): far below the spread of the stays, not a log-scale number
    spread = float(np.abs(dm.frames["val"]["stay"] - dm.frames["val"]["stay"].median()).mean())
    assert 1.0 < float(val["val/stay/mae"]) < 0.6 * spread  # a log-scale MAE would be well below 1
    assert float(val["val/stay/loss"]) < 0.2  # the loss is on the log scale
