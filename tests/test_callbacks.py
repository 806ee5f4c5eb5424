"""BestValidation: model selection on the validation split, early stopping, best weights restored."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import TABULAR_TASKS, DictDataset, toy_tabular
from torch.utils.data import DataLoader

from lightning_mtl import MultiTaskModule
from lightning_mtl.backbones import MLPBackbone
from lightning_mtl.callbacks import BestValidation


class Scripted(MultiTaskModule):
    """Logs a scripted validation loss per epoch (and remembers the weights each epoch ended with)."""

    def __init__(self, script: list[float]) -> None:
        super().__init__(MLPBackbone(8, hidden=(8,), dropout=0.0), TABULAR_TASKS, lr=1e-2)
        self.script = script
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def validation_step(self, batch, batch_idx):
        value = self.script[self.current_epoch]
        for name in self.tasks:  # the score is the sum over the tasks
            self.log(f"val/{name}/loss", torch.tensor(value / len(self.tasks)))

    def on_validation_epoch_end(self):
        self.snapshots.append({k: v.clone() for k, v in self.state_dict().items()})


def fit(module: MultiTaskModule, callback: BestValidation, epochs: int) -> L.Trainer:
    data = DataLoader(DictDataset(toy_tabular(32)), batch_size=16)
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, data, data)
    return trainer


def test_keeps_the_best_weights_and_stops_after_patience():
    torch.manual_seed(0)
    module = Scripted([3.0, 1.0, 2.0, 1.5, 1.2, 0.1, 0.05])
    best = BestValidation(patience=3)
    fit(module, best, epochs=7)
    assert len(module.snapshots) == 5  # epochs 2, 3, 4 do not improve on epoch 1: stop after the third
    assert (best.best_epoch, best.best_check, best.best_score) == (1, 1, 1.0)
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, module.snapshots[1][key])  # the weights of the best epoch
    assert not torch.equal(
        module.snapshots[1]["backbone.net.0.weight"], module.snapshots[3]["backbone.net.0.weight"]
    )
    # one instance serves the next fit from scratch
    again = Scripted([5.0, 4.0])
    fit(again, best, epochs=2)
    assert (best.best_epoch, best.best_score) == (1, 4.0)


def test_min_delta_counts_small_gains_as_no_improvement():
    module = Scripted([1.0, 0.99, 0.98, 0.97])
    best = BestValidation(patience=2, min_delta=0.05)
    fit(module, best, epochs=4)
    assert best.best_epoch == 0 and len(module.snapshots) == 3


def test_missing_validation_loss_is_named():
    class NoVal(Scripted):
        def validation_step(self, batch, batch_idx):
            self.log("val/risk/loss", torch.tensor(1.0))

    with pytest.raises(KeyError, match=r"missing \['val/group/loss'"):
        fit(NoVal([1.0]), BestValidation(), epochs=1)
    with pytest.raises(ValueError, match="patience must be >= 1"):
        BestValidation(patience=0)
