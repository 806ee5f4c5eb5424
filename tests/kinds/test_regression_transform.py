"""``Task(target_transform="log1p")`` for regression: the loss sees log1p(target), metrics and predictions
are in the target's units; other kinds and names are refused."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.backbones import MLPBackbone

NAN = float("nan")


def stay(**kwargs) -> Task:
    return Task("stay", kind="regression", target_key="slos", target_transform="log1p", **kwargs)


def test_mask_puts_the_loss_on_the_log_scale_and_the_metrics_in_units():
    task = stay()
    outputs = torch.tensor([[1.0], [2.0], [0.5]])
    target = torch.tensor([3.0, NAN, 10.0])
    masked = task.kind_obj.mask(task, outputs, target)
    assert masked.count == 2
    assert torch.allclose(masked.loss_input, torch.tensor([1.0, 0.5]))
    assert torch.allclose(masked.loss_target, torch.log1p(torch.tensor([3.0, 10.0])))
    assert torch.allclose(masked.metric_preds, torch.expm1(torch.tensor([1.0, 0.5])))
    assert torch.equal(masked.metric_target, torch.tensor([3.0, 10.0]))


def test_predictions_are_in_units():
    task = stay()
    assert task.kind_obj.postprocess(task, torch.tensor([[math.log1p(9.0)]])).tolist() == pytest.approx([9.0])
    assert task.describe(torch.tensor([[math.log1p(4.0)]]))[0]["value"] == pytest.approx(4.0)
    plain = Task("stay", kind="regression")
    assert plain.describe(torch.tensor([[2.0]])) == [{"value": 2.0}]  # unchanged without a transform


def test_module_loss_and_metrics():
    torch.manual_seed(0)
    module = MultiTaskModule(MLPBackbone(4, hidden=(8,), dropout=0.0), [stay()])
    outputs = {"stay": torch.tensor([[1.0], [2.0]])}
    target = torch.tensor([5.0, 1.0])
    loss = module.compute_losses(outputs, {"stay": target}, "val")["stay"]
    assert loss.item() == pytest.approx(F.mse_loss(torch.tensor([1.0, 2.0]), torch.log1p(target)).item())
    mae = module.units["stay"].collection("val")["mae"].compute().item()
    assert mae == pytest.approx(((torch.expm1(torch.tensor([1.0, 2.0])) - target).abs().mean()).item())


def test_targets_at_or_below_minus_one_are_refused():
    task = stay()
    with pytest.raises(
        ValueError, match=r"Task 'stay', target key 'slos': target_transform 'log1p' needs targets above -1"
    ):
        task.kind_obj.check(task, torch.zeros(2, 1), torch.tensor([2.0, -1.0]))
    task.kind_obj.check(task, torch.zeros(2, 1), torch.tensor([0.0, NAN]))  # zero and missing are fine


@pytest.mark.parametrize(
    ("kind", "name", "message"),
    [
        ("binary", "log1p", r"target_transform 'log1p' is not supported by kind 'binary'; use None"),
        (
            "regression",
            "log",
            r"target_transform 'log' is not supported by kind 'regression'; choose one of \['log1p'\]",
        ),
    ],
)
def test_unsupported_transforms_are_refused(kind, name, message):
    with pytest.raises(ValueError, match=message):
        Task("t", kind=kind, target_transform=name)


def test_round_trip_and_specs_without_the_field():
    task = stay()
    assert Task.from_dict(task.to_dict()) == task
    old = {
        k: v for k, v in task.to_dict().items() if k != "target_transform"
    }  # a config from before the field
    assert Task.from_dict(old).target_transform is None
