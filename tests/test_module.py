"""MultiTaskModule end to end: every kind learns, masking, heterogeneous data, checkpoints, predict, subclassing."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import (
    TABULAR_TASKS,
    DictDataset,
    RecordingLogger,
    ToyConvBackbone,
    ToyTokenBackbone,
    fit,
    logged_keys,
    toy_tabular,
)
from lightning.pytorch.utilities import CombinedLoader
from torch import nn
from torch.utils.data import DataLoader

from lightning_mtl import MultiTaskDataModule, MultiTaskModule, Task
from lightning_mtl.backbones import MLPBackbone


def eval_losses(module: MultiTaskModule, batch) -> dict[str, float]:
    module.eval()
    with torch.no_grad():
        losses, _ = module.shared_step(batch, "test")
    module.train()
    return {k: float(v) for k, v in losses.items()}


def tabular_module(**kwargs) -> MultiTaskModule:
    torch.manual_seed(0)
    return MultiTaskModule(MLPBackbone(8, hidden=(64,), dropout=0.0), TABULAR_TASKS, lr=1e-2, **kwargs)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_tabular_kinds_learn(precision):
    data = toy_tabular(512)
    module = tabular_module()
    batch = {k: v[:256] for k, v in data.items()}
    before = eval_losses(module, batch)
    fit(module, DataLoader(DictDataset(data), batch_size=64, shuffle=True), steps=120, precision=precision)
    after = eval_losses(module, batch)
    for name in ("risk", "group", "flags", "stay"):
        assert math.isfinite(after[name])
        assert after[name] < 0.6 * before[name], (name, before[name], after[name])


def test_token_kind_learns():
    torch.manual_seed(0)
    ids = torch.randint(1, 20, (256, 12))
    tags = ids % 3
    tags[:, -3:] = -100  # padding positions are ignored
    module = MultiTaskModule(ToyTokenBackbone(), [Task("pos", kind="token", labels=["x", "y", "z"])], lr=1e-2)
    batch = {"input_ids": ids[:64], "pos": tags[:64]}
    before = eval_losses(module, batch)["pos"]
    fit(
        module,
        DataLoader(DictDataset({"input_ids": ids, "pos": tags}), batch_size=32, shuffle=True),
        steps=80,
    )
    assert eval_losses(module, batch)["pos"] < 0.3 * before
    preds = module.predict({"input_ids": ids[:2]})["pos"]
    assert len(preds[0]["labels"]) == 12 and set(preds[0]["labels"]) <= {"x", "y", "z"}


def test_dense_kind_learns():
    torch.manual_seed(0)
    images = torch.randn(128, 1, 8, 8)
    masks = (images[:, 0] > 0.5).long()
    masks[:, 0, :] = -100  # an unlabelled row of pixels
    module = MultiTaskModule(
        ToyConvBackbone(),
        [
            Task("seg", kind="dense", labels=["bg", "ink"], head_kwargs={"hidden": 8}),
            Task("bright", kind="regression"),
        ],
        lr=1e-2,
    )
    data = {"image": images, "seg": masks, "bright": images.mean((1, 2, 3))}
    batch = {k: v[:32] for k, v in data.items()}
    before = eval_losses(module, batch)["seg"]
    trainer = fit(module, DataLoader(DictDataset(data), batch_size=32, shuffle=True), steps=80)
    assert eval_losses(module, batch)["seg"] < 0.5 * before
    trainer.validate(module, DataLoader(DictDataset(data), batch_size=32), verbose=False)
    assert float(trainer.callback_metrics["val/seg/pixel_accuracy"]) > 0.9
    assert 0.0 < float(trainer.callback_metrics["val/seg/miou"]) <= 1.0


def _outputs(module, batch):
    module.eval()
    with torch.no_grad():
        return module(batch["x"])


@pytest.mark.parametrize(
    ("task", "missing"),
    [("risk", float("nan")), ("risk", -100.0), ("group", -100), ("stay", float("nan"))],
)
def test_missing_label_changes_neither_loss_nor_metrics(task, missing):
    module = tabular_module()
    data = toy_tabular(16)
    outputs = _outputs(module, data)
    masked_targets = {k: v.clone() for k, v in data.items() if k != "x"}
    masked_targets[task][0] = missing
    kept = {k: v[1:] for k, v in data.items() if k != "x"}
    losses_masked = module.compute_losses(outputs, masked_targets, "val")
    metric_masked = {k: float(v) for k, v in module.units[task].collection("val").compute().items()}
    module.units[task].collection("val").reset()
    losses_kept = module.compute_losses({k: v[1:] for k, v in outputs.items()}, kept, "val")
    metric_kept = {k: float(v) for k, v in module.units[task].collection("val").compute().items()}
    assert torch.allclose(losses_masked[task], losses_kept[task])
    assert metric_masked == pytest.approx(metric_kept)
    # and the loss really depends on the labelled examples
    shifted = {k: v.clone() for k, v in masked_targets.items()}
    shifted[task][1] = 1 - shifted[task][1] if task != "stay" else shifted[task][1] + 5
    assert not torch.allclose(module.compute_losses(outputs, shifted, "val")[task], losses_masked[task])


def test_multilabel_masks_single_entries_and_absent_keys():
    module = tabular_module()
    data = toy_tabular(16)
    outputs = _outputs(module, data)
    targets = {k: v for k, v in data.items() if k != "x"}
    flags = targets["flags"].clone()
    flags[0, 1] = float("nan")
    loss = module.compute_losses(outputs, {**targets, "flags": flags}, "val")["flags"]
    expected = nn.functional.binary_cross_entropy_with_logits(
        outputs["flags"][~flags.isnan()], flags[~flags.isnan()]
    )
    assert torch.allclose(loss, expected)
    # an absent key: the task is left out of the losses; training_step still reaches its head with a zero
    # term (DDP needs every parameter in the graph)
    module.train()
    losses = module.compute_losses(module(data["x"]), {"risk": targets["risk"]}, "train")
    assert set(losses) == {"risk"}
    total = module.training_step({"x": data["x"], "risk": targets["risk"]}, 0)
    total.backward()
    assert module.heads["group"].proj.weight.grad is not None
    assert float(module.heads["group"].proj.weight.grad.abs().sum()) == 0.0


def test_heterogeneous_datasets_each_through_the_backbone():
    data = toy_tabular(256)
    ds_risk = DictDataset({"x": data["x"][:200], "risk": data["risk"][:200]})
    ds_stay = DictDataset({"x": data["x"][128:], "stay": data["stay"][128:]})
    module = MultiTaskModule(
        MLPBackbone(8, hidden=(64,), dropout=0.0), [TABULAR_TASKS[0], TABULAR_TASKS[3]], lr=1e-2
    )
    loaders = {
        "risk": DataLoader(ds_risk, batch_size=32, shuffle=True),
        "stay": DataLoader(ds_stay, batch_size=16, shuffle=True),
    }
    groups = module.split_batch({"risk": next(iter(loaders["risk"])), "stay": None})
    assert [g.tasks for g in groups] == [["risk"]] and set(groups[0].inputs) == {"x"}
    before = eval_losses(module, {"x": data["x"], "risk": data["risk"], "stay": data["stay"]})
    logger = RecordingLogger()
    fit(module, CombinedLoader(loaders, mode="max_size_cycle"), steps=100, logger=logger, log_every_n_steps=1)
    after = eval_losses(module, {"x": data["x"], "risk": data["risk"], "stay": data["stay"]})
    assert after["risk"] < 0.7 * before["risk"] and after["stay"] < 0.5 * before["stay"]
    # both tasks were logged at every step with their own key
    steps = [m for _, m in logger.history if "train/loss" in m]
    assert len(steps) == 100
    assert all(
        {"train/risk/loss", "train/stay/loss", "weights/risk", "weights/stay"} <= set(m) for m in steps
    )


def test_datamodule_heterogeneous_validation_logs_every_task(tmp_path):
    from datasets import Dataset

    data = toy_tabular(200)
    rows = lambda n, key: Dataset.from_dict({"x": data["x"][:n].tolist(), key: data[key][:n].tolist()})  # noqa: E731
    dm = MultiTaskDataModule(
        {"risk": rows(200, "risk"), "stay": rows(60, "stay")},
        [TABULAR_TASKS[0], TABULAR_TASKS[3]],
        batch_size=16,
    )
    module = MultiTaskModule(
        MLPBackbone(8, hidden=(32,), dropout=0.0), [TABULAR_TASKS[0], TABULAR_TASKS[3]], lr=1e-2
    )
    trainer = fit(module, dm, steps=20, max_epochs=2)
    result = trainer.validate(module, dm, verbose=False)[0]
    assert {
        "val/risk/accuracy",
        "val/risk/f1",
        "val/risk/auroc",
        "val/risk/loss",
        "val/stay/mae",
        "val/stay/rmse",
        "val/stay/r2",
    } <= set(result)
    assert all(math.isfinite(v) for v in result.values())


def test_checkpoint_round_trip_weights_only(tmp_path, boring_module):
    data = {k: v for k, v in toy_tabular(128).items() if k in ("x", "risk", "stay")}
    trainer = fit(boring_module, DataLoader(DictDataset(data), batch_size=32), steps=10)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    torch.load(path, weights_only=True)  # no pickle needed
    loaded = MultiTaskModule.load_from_checkpoint(path, weights_only=True)
    assert loaded.predict(data["x"][:8]) == boring_module.predict(data["x"][:8])
    assert [t.to_dict() for t in loaded.tasks.values()] == [t.to_dict() for t in boring_module.tasks.values()]


def test_live_backbone_without_spec_needs_it_again(tmp_path):
    module = MultiTaskModule(nn.Sequential(nn.Linear(8, 4), nn.ReLU()), [TABULAR_TASKS[0]], feature_dim=4)
    data = {k: v for k, v in toy_tabular(64).items() if k in ("x", "risk")}
    trainer = fit(module, DataLoader(DictDataset(data), batch_size=32), steps=2)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    with pytest.raises(ValueError, match=r"load_from_checkpoint\(path, backbone="):
        MultiTaskModule.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=True)
    loaded = MultiTaskModule.load_from_checkpoint(
        tmp_path / "m.ckpt", weights_only=True, backbone=nn.Sequential(nn.Linear(8, 4), nn.ReLU())
    )
    x = torch.randn(4, 8)
    assert loaded.predict(x) == module.predict(x)


def test_predict_formats():
    module = tabular_module()
    preds = module.predict(torch.randn(3, 8))
    assert set(preds) == {"risk", "group", "flags", "stay"}
    assert all(len(v) == 3 for v in preds.values())
    r = preds["risk"][0]
    assert r["label"] in {"low", "high"} and r["probabilities"][r["label"]] == pytest.approx(r["probability"])
    assert sum(preds["group"][0]["probabilities"].values()) == pytest.approx(1.0)
    assert set(preds["flags"][0]["labels"]) <= {"f0", "f1"} and set(preds["flags"][0]["probabilities"]) == {
        "f0",
        "f1",
    }
    assert isinstance(preds["stay"][0]["value"], float)
    assert module.training  # predict restores the mode


class FeatureDecayModule(MultiTaskModule):
    """A user subclass: an auxiliary L2 penalty on the shared features."""

    def extra_losses(self, features, outputs, group, stage):
        return {"feature_l2": 10.0 * features.pow(2).mean()}


def test_subclass_extra_loss_changes_training():
    data = {k: v for k, v in toy_tabular(256).items() if k in ("x", "risk")}
    loader = DataLoader(DictDataset(data), batch_size=32)
    torch.manual_seed(0)
    plain = MultiTaskModule(
        MLPBackbone(8, hidden=(32,), dropout=0.0, norm=False), [TABULAR_TASKS[0]], lr=1e-2
    )
    sub = copy.deepcopy(plain)
    sub.__class__ = FeatureDecayModule
    fit(plain, loader, steps=40)
    logger = RecordingLogger()
    fit(sub, loader, steps=40, logger=logger, log_every_n_steps=10)
    assert [step for step, m in logger.history if "train/extra/feature_l2" in m] == [9, 19, 29, 39]
    with torch.no_grad():
        norm_plain = plain.backbone(data["x"]).pow(2).mean()
        norm_sub = sub.backbone(data["x"]).pow(2).mean()
    assert norm_sub < 0.5 * norm_plain


def test_bad_targets_give_clear_errors():
    module = tabular_module()
    x = torch.randn(4, 8)
    with pytest.raises(
        ValueError, match=r"Task 'group', target key 'group': class id 7 is out of range for 3 classes"
    ):
        module.shared_step({"x": x, "group": torch.tensor([0, 1, 7, 2])}, "train")
    with pytest.raises(
        ValueError, match=r"Task 'risk', target key 'risk': expected shape \[batch\] = \[4\], got \(4, 2\)"
    ):
        module.shared_step({"x": x, "risk": torch.zeros(4, 2)}, "train")
    with pytest.raises(ValueError, match=r"Task 'group'.*expected integer class ids"):
        module.shared_step({"x": x, "group": torch.zeros(4)}, "train")
    with pytest.raises(ValueError, match=r"Task 'flags'.*expected shape \[batch, num_labels\]"):
        module.shared_step({"x": x, "flags": torch.zeros(4, 3)}, "train")
    with pytest.raises(TypeError, match="Unsupported batch type"):
        module.shared_step(42, "train")
    with pytest.raises(KeyError, match="no inputs for the backbone"):
        module.shared_step({"risk": torch.zeros(4)}, "train")
    with pytest.raises(TypeError, match=r"batch keys \['extra', 'x'\].*input_keys"):
        module.shared_step({"x": x, "extra": x, "risk": torch.zeros(4)}, "train")
    chosen = MultiTaskModule(MLPBackbone(8), TABULAR_TASKS, input_keys=["x"])
    assert set(chosen.shared_step({"x": x, "extra": x, "risk": torch.zeros(4)}, "train")[0]) == {"risk"}


def test_construction_errors():
    with pytest.raises(ValueError, match="feature_dim"):
        MultiTaskModule(nn.Sequential(nn.Linear(8, 4)), [TABULAR_TASKS[0]])
    with pytest.raises(ValueError, match="unique"):
        MultiTaskModule(MLPBackbone(8), [TABULAR_TASKS[0], TABULAR_TASKS[0]])
    with pytest.raises(ValueError, match=r"Balancer 'equal' does not use Task.weight"):
        MultiTaskModule(MLPBackbone(8), [Task("a", kind="binary", weight=2.0)], balancer="equal")


def test_train_metrics_can_be_switched_off():
    data = toy_tabular(64)
    loader = torch.utils.data.DataLoader(DictDataset(data), batch_size=16)
    torch.manual_seed(0)
    module = MultiTaskModule(MLPBackbone(8, hidden=(16,)), TABULAR_TASKS, train_metrics=False)
    logger = RecordingLogger()
    trainer = fit(
        module, loader, steps=8, limit_val_batches=2, logger=logger, log_every_n_steps=1
    )  # 2 epochs
    logged = logged_keys(logger) | set(trainer.callback_metrics)
    assert "train/risk/loss" in logged
    assert not any(k.startswith("train/") and k.count("/") == 2 and not k.endswith("/loss") for k in logged)
    trainer.validate(module, loader, verbose=False)
    assert "val/risk/accuracy" in trainer.callback_metrics
    assert module.units["risk"].collection("train")["accuracy"].update_count == 0
    assert module.hparams["train_metrics"] is False
