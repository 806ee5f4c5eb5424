"""Task: validation, serialisation, metric selection and custom losses / metrics."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import BinaryAccuracy, BinaryF1Score

from lightning_mtl import MultiTaskModule, Task, list_kinds, trusted
from lightning_mtl.backbones import MLPBackbone
from lightning_mtl.kinds import LOSSES, get_kind

# --- validation ---------------------------------------------------------------------------------------


def test_unknown_kind():
    with pytest.raises(ValueError, match=r"Task 't': unknown kind 'classify'; choose one of \['binary'"):
        Task("t", kind="classify")


def test_duplicate_labels():
    with pytest.raises(ValueError, match=r"Task 't': duplicate label names in \['a', 'b', 'a'\]"):
        Task("t", kind="multiclass", labels=["a", "b", "a"])


@pytest.mark.parametrize("name", ["a/b", "", None, 3])
def test_bad_name(name):
    with pytest.raises(ValueError, match="Task name must be a non-empty string without '/'"):
        Task(name, kind="binary")


def test_unknown_loss_name():
    with pytest.raises(
        ValueError, match=r"Task 't': unknown loss 'cross_entropy'; choose one of \['bce', 'ce'"
    ):
        Task("t", kind="multiclass", labels=["a", "b"], loss="cross_entropy")


@pytest.mark.parametrize("kind", ["multiclass", "multilabel", "token", "dense"])
def test_kinds_that_need_labels(kind):
    assert get_kind(kind).needs_labels
    with pytest.raises(ValueError, match=r"Task 't' .*needs `labels=\[...\]` or `num_outputs=N`"):
        Task("t", kind=kind)
    assert Task("t", kind=kind, num_outputs=4).out_features == 4
    assert Task("t", kind=kind, labels=["x", "y", "z"]).out_features == 3


def test_binary_with_three_labels():
    with pytest.raises(
        ValueError, match=r"Task 't' is binary: `labels` must name 2 classes, got \['a', 'b', 'c'\]"
    ):
        Task("t", kind="binary", labels=["a", "b", "c"])
    assert Task("t", kind="binary").out_features == 1
    assert Task("t", kind="binary", labels=["no", "yes"]).out_features == 1


def test_regression_width():
    assert Task("r", kind="regression").out_features == 1
    assert Task("r", kind="regression", labels=["lo", "hi"]).out_features == 2
    assert Task("r", kind="regression", num_outputs=3).out_features == 3


def test_negative_weight():
    with pytest.raises(ValueError, match=r"Task 't': weight must be >= 0, got -1.0"):
        Task("t", kind="binary", weight=-1.0)


def test_defaults_and_label_coercion():
    t = Task("topic", kind="multiclass", labels=[0, 1, 2])
    assert t.labels == ["0", "1", "2"]
    assert (
        t.target_key == "topic"
        and t.feature_key == "pooled"
        and t.head == "linear"
        and t.head_name == "linear"
    )
    tok = Task("ner", kind="token", labels=["O", "B"], target_key="tags")
    assert tok.target_key == "tags" and tok.feature_key == "tokens" and tok.head == "token"
    assert Task("seg", kind="dense", labels=["a", "b"]).feature_key == "spatial"
    assert Task("x", kind="binary", feature_key="tokens", head="mlp").feature_key == "tokens"


def test_coerce():
    t = Task("a", kind="binary")
    assert Task.coerce(t) is t
    assert Task.coerce({"name": "a", "kind": "binary"}) == t
    with pytest.raises(TypeError, match="Expected a Task or a dict, got str"):
        Task.coerce("a")


# --- serialisation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list_kinds())
def test_to_dict_from_dict_round_trip(kind):
    task = Task(
        f"t_{kind}",
        kind=kind,
        labels=["a", "b"],
        head_kwargs={"dropout": 0.2},
        weight=0.5,
        target_key=f"col_{kind}",
        threshold=0.3,
    )
    data = task.to_dict()
    assert data["kind"] == kind and data["labels"] == ["a", "b"] and data["head"] == task.head
    assert Task.from_dict(data) == task
    # and through JSON (checkpoint hyper-parameters, config.json)
    assert Task.from_dict(json.loads(json.dumps(data))) == task


def test_round_trip_with_specs():
    task = Task(
        "r",
        kind="regression",
        loss={"class_path": "torch.nn.SmoothL1Loss", "init_args": {"beta": 0.5}},
        metrics={"mae": {"class_path": "torchmetrics.MeanAbsoluteError"}},
    )
    again = Task.from_dict(json.loads(json.dumps(task.to_dict())))
    assert again == task
    assert again.build_loss().fn.beta == 0.5


def test_from_dict_unknown_keys():
    with pytest.raises(
        ValueError, match=r"Task spec has unknown keys \['colour', 'labelz'\]; known keys: .*'labels'"
    ):
        Task.from_dict({"name": "t", "kind": "binary", "labelz": ["a", "b"], "colour": "red"})


# --- metrics ------------------------------------------------------------------------------------------


def test_metric_presets_default():
    assert set(Task("b", kind="binary").build_metrics()) == {"accuracy", "f1", "auroc"}
    assert set(Task("r", kind="regression").build_metrics()) == {"mae", "rmse", "r2"}


def test_metric_subset():
    collection = Task("b", kind="binary", metrics=["f1"]).build_metrics()
    assert list(collection) == ["f1"]
    assert isinstance(collection["f1"], BinaryF1Score)


def test_unknown_metric_name():
    task = Task("b", kind="binary", metrics=["accuracy", "precision"])
    with pytest.raises(
        ValueError,
        match=r"Task 'b': unknown metric\(s\) \['precision'\]; kind 'binary' offers \['accuracy', 'auroc', 'f1'\]",
    ):
        task.build_metrics()


def test_custom_metric_spec():
    task = Task(
        "b",
        kind="binary",
        metrics={"acc": {"class_path": "torchmetrics.classification.BinaryAccuracy", "init_args": {}}},
    )
    collection = task.build_metrics()
    assert list(collection) == ["acc"] and isinstance(collection["acc"], BinaryAccuracy)
    collection.update(torch.tensor([0.9, 0.2, 0.8, 0.1]), torch.tensor([1, 0, 0, 0]))
    assert float(collection.compute()["acc"]) == pytest.approx(0.75)
    # each call builds a fresh collection (one per split)
    assert task.build_metrics()["acc"] is not collection["acc"]


def test_custom_metric_spec_with_init_args_and_bad_path():
    task = Task(
        "b",
        kind="binary",
        metrics={
            "acc": {
                "class_path": "torchmetrics.classification.BinaryAccuracy",
                "init_args": {"threshold": 0.95},
            }
        },
    )
    collection = task.build_metrics()
    collection.update(torch.tensor([0.9]), torch.tensor([1]))
    assert float(collection.compute()["acc"]) == 0.0  # 0.9 < 0.95: predicted negative
    broken = Task("b", kind="binary", metrics={"x": {"class_path": "torchmetrics.NoSuchMetric"}})
    with pytest.raises(ImportError, match=r"torchmetrics\.NoSuchMetric"):
        broken.build_metrics()


def test_threshold_reaches_preset_metrics():
    collection = Task("b", kind="binary", metrics=["accuracy"], threshold=0.95).build_metrics()
    collection.update(torch.tensor([0.9]), torch.tensor([1]))
    assert float(collection.compute()["accuracy"]) == 0.0


# --- losses -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list_kinds())
def test_default_loss_of_kind(kind):
    task = Task("t", kind=kind, labels=["a", "b"])
    loss = task.build_loss()
    assert loss.fn is LOSSES[get_kind(kind).default_loss] and loss.name == get_kind(kind).default_loss
    assert loss.elementwise and loss.builtin


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_named_loss(name):
    loss = Task("r", kind="regression", loss=name).build_loss()
    assert loss.fn is LOSSES[name] and loss.elementwise
    pred, target = torch.randn(5, 3), torch.rand(5, 3)
    if name == "ce":
        pred, target = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    # per element, no reduction: the module weighs missing labels out on these values
    assert torch.allclose(loss(pred, target), LOSSES[name](pred, target, reduction="none"))


def test_custom_loss_spec_matches_torch():
    task = Task("r", kind="regression", loss={"class_path": "torch.nn.SmoothL1Loss"})
    loss = task.build_loss()
    assert isinstance(loss.fn, nn.SmoothL1Loss) and loss.fn.reduction == "none" and loss.elementwise
    torch.manual_seed(0)
    pred, target = torch.randn(16) * 3, torch.randn(16) * 3
    assert torch.allclose(loss(pred, target), F.smooth_l1_loss(pred, target, reduction="none"))
    beta = Task(
        "r", kind="regression", loss={"class_path": "torch.nn.SmoothL1Loss", "init_args": {"beta": 0.25}}
    ).build_loss()
    assert torch.allclose(beta(pred, target), F.smooth_l1_loss(pred, target, beta=0.25, reduction="none"))
    assert not torch.allclose(beta(pred, target), loss(pred, target))


def test_custom_loss_spec_used_by_module_on_masked_targets():
    task = Task("r", kind="regression", loss={"class_path": "torch.nn.SmoothL1Loss"})
    torch.manual_seed(0)
    module = MultiTaskModule(MLPBackbone(4, hidden=(8,), dropout=0.0), [task])
    assert isinstance(module.units["r"].loss_module, nn.SmoothL1Loss)
    x = torch.randn(6, 4)
    target = torch.tensor([1.0, float("nan"), 3.0, -2.0, float("nan"), 0.5])
    with torch.no_grad():
        out = module(x)["r"][:, 0]
        loss = module.compute_losses(module(x), {"r": target}, "val")["r"]
    keep = ~torch.isnan(target)
    assert torch.allclose(loss, F.smooth_l1_loss(out[keep], target[keep]))


def test_bad_loss_specs():
    with pytest.raises(ImportError, match=r"torch\.nn\.NoSuchLoss"):
        Task("r", kind="regression", loss={"class_path": "torch.nn.NoSuchLoss"}).build_loss()
    with pytest.raises(TypeError, match="expected a dict with 'class_path'"):
        Task("r", kind="regression", loss={"init_args": {}}).build_loss()


def test_describe_goes_through_the_kind():
    task = Task("topic", kind="multiclass", labels=["a", "b", "c"])
    described = task.describe(torch.tensor([[0.0, 0.0, 4.0]]))
    assert described[0]["label"] == "c"
    assert sum(described[0]["probabilities"].values()) == pytest.approx(1.0)


class OnlyMean(nn.Module):
    """A loss that can only reduce (no ``reduction`` attribute): given the labelled elements instead."""

    def forward(self, pred, target):
        return (pred - target).abs().mean()


def test_a_loss_without_reduction_gets_the_labelled_elements():
    task = Task("r", kind="regression", loss={"class_path": "test_tasks.OnlyMean"})
    with trusted("test_tasks"):  # a class of the user's own project: trusted explicitly
        assert not task.build_loss().elementwise
        torch.manual_seed(0)
        module = MultiTaskModule(MLPBackbone(4, hidden=(8,), dropout=0.0), [task])
    x = torch.randn(6, 4)
    target = torch.tensor([1.0, float("nan"), 3.0, -2.0, float("nan"), 0.5])
    with torch.no_grad():
        out = module(x)["r"][:, 0]
        loss = module.compute_losses(module(x), {"r": target}, "val")["r"]
        none, count = module.units["r"].loss(module(x)["r"], torch.full((6,), float("nan")))
    keep = ~torch.isnan(target)
    assert torch.allclose(loss, (out[keep] - target[keep]).abs().mean())
    assert float(none) == 0.0 and int(count) == 0  # no label: 0, not NaN
