"""Balancers: equal/static maths, construction from names/specs/instances, the registry, zero weights."""

from __future__ import annotations

import itertools

import lightning as L
import pytest
import torch
from conftest import RecordingLogger
from torch.utils.data import DataLoader

from lightning_mtl import MultiTaskModule, Task, list_balancers, register_balancer
from lightning_mtl.backbones import MLPBackbone
from lightning_mtl.balancing import Balanced, Balancer, EqualWeighting, StaticWeighting, create_balancer
from lightning_mtl.balancing.base import TaskLosses

_counter = itertools.count()


def losses(grad: bool = False, **values: float) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, requires_grad=grad) for k, v in values.items()}


def tasks(**weights: float) -> list[Task]:
    return [Task(name, kind="regression", weight=w) for name, w in weights.items()]


# --- maths --------------------------------------------------------------------------------------------


def test_equal_is_the_plain_sum():
    balancer = EqualWeighting()
    balancer.setup(tasks(a=1.0, b=1.0, c=1.0))
    out = balancer(losses(a=1.5, b=2.0, c=0.25))
    assert isinstance(out, Balanced)
    assert float(out.loss) == pytest.approx(3.75)
    assert {k: float(v) for k, v in out.weights.items()} == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert all(isinstance(v, torch.Tensor) for v in out.weights.values())


def test_equal_rejects_task_weights():
    with pytest.raises(
        ValueError, match=r"Balancer 'equal' does not use Task.weight, but tasks \{'b': 2.0\} set one"
    ):
        EqualWeighting().setup(tasks(a=1.0, b=2.0))


def test_static_uses_task_weight_by_default():
    balancer = StaticWeighting()
    balancer.setup(tasks(a=0.5, b=2.0, c=0.0))
    values = losses(grad=True, a=4.0, b=1.5, c=100.0)
    out = balancer(values)
    assert float(out.loss.detach()) == pytest.approx(0.5 * 4.0 + 2.0 * 1.5 + 0.0)
    assert {k: float(v) for k, v in out.weights.items()} == {"a": 0.5, "b": 2.0, "c": 0.0}
    out.loss.backward()
    assert [float(values[k].grad) for k in "abc"] == [0.5, 2.0, 0.0]


def test_static_default_weights_are_one():
    balancer = StaticWeighting()
    balancer.setup(tasks(a=1.0, b=1.0))
    assert float(balancer(losses(a=1.0, b=2.0)).loss) == pytest.approx(3.0)


def test_static_refuses_weights_given_in_two_places():
    balancer = StaticWeighting({"a": 3.0, "b": 0.1})
    with pytest.raises(ValueError, match="one place only"):
        balancer.setup(tasks(a=0.5, b=2.0))
    balancer.setup(tasks(a=1.0, b=1.0))  # default task weights: the explicit dict rules
    assert float(balancer(losses(a=1.0, b=10.0)).loss) == pytest.approx(3.0 + 1.0)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"a": 1.0}, r"unknown \[\], missing \['b'\]"),
        ({"a": 1.0, "b": 1.0, "c": 1.0}, r"unknown \['c'\], missing \[\]"),
        ({"a": 1.0, "x": 1.0}, r"unknown \['x'\], missing \['b'\]"),
        ({}, r"unknown \[\], missing \['a', 'b'\]"),
    ],
)
def test_static_explicit_weights_must_name_every_task(weights, message):
    with pytest.raises(ValueError, match=r"StaticWeighting weights must name every task exactly: " + message):
        StaticWeighting(weights).setup(tasks(a=1.0, b=1.0))


def test_static_negative_weights_raise():
    with pytest.raises(
        ValueError, match=r"StaticWeighting weights must be >= 0, got \{'a': -1.0, 'b': 1.0\}"
    ):
        StaticWeighting({"a": -1.0, "b": 1.0}).setup(tasks(a=1.0, b=1.0))
    with pytest.raises(ValueError, match="weight must be >= 0"):
        Task("a", kind="binary", weight=-0.5)


@pytest.mark.parametrize(
    ("balancer", "expected"),
    [(EqualWeighting(), 1.5), (StaticWeighting(), 1.5), (StaticWeighting({"a": 2.0, "b": 3.0}), 3.0)],
)
def test_task_absent_from_losses_is_fine(balancer, expected):
    balancer.setup(tasks(a=1.0, b=1.0))
    out = balancer(losses(a=1.5))
    assert set(out.weights) == {"a"}
    assert float(out.loss) == pytest.approx(expected)


def test_static_spec_round_trip():
    balancer = StaticWeighting({"a": 0.25, "b": 4.0})
    spec = balancer.spec()
    assert spec == {
        "class_path": "lightning_mtl.balancing.static.StaticWeighting",
        "init_args": {"weights": {"a": 0.25, "b": 4.0}},
    }
    rebuilt = create_balancer(spec)
    rebuilt.setup(tasks(a=1.0, b=1.0))
    assert float(rebuilt(losses(a=4.0, b=1.0)).loss) == pytest.approx(5.0)
    assert StaticWeighting().spec()["init_args"] == {}


# --- construction -------------------------------------------------------------------------------------


def test_create_balancer_from_name():
    assert type(create_balancer("equal")) is EqualWeighting
    assert type(create_balancer("static")) is StaticWeighting
    assert type(create_balancer(None)) is StaticWeighting  # the default
    with pytest.raises(
        KeyError,
        match=r"Unknown balancer 'nope'\. Registered balancers: \[.*'equal', .*'static', .*'upgrad'\]",
    ):
        create_balancer("nope")


def test_create_balancer_from_spec_dicts():
    by_path = create_balancer(
        {"class_path": "lightning_mtl.balancing.StaticWeighting", "init_args": {"weights": {"a": 2.0}}}
    )
    assert type(by_path) is StaticWeighting and by_path.weights == {"a": 2.0}
    by_name = create_balancer({"name": "static", "weights": {"a": 3.0}})
    assert type(by_name) is StaticWeighting and by_name.weights == {"a": 3.0}
    assert type(create_balancer({"class_path": "lightning_mtl.balancing.EqualWeighting"})) is EqualWeighting
    with pytest.raises(
        ValueError, match=r"'torch.nn.Linear' is not a subclass of .*Balancer; it was not called"
    ):
        create_balancer({"class_path": "torch.nn.Linear", "init_args": {"in_features": 1, "out_features": 1}})


def test_create_balancer_from_instance_is_that_instance():
    balancer = StaticWeighting({"a": 1.0})
    assert create_balancer(balancer) is balancer


def test_register_balancer_duplicate_raises():
    for name in list_balancers():
        with pytest.raises(ValueError, match=rf"A balancer named '{name}' is already registered"):

            @register_balancer(name)
            class Other(Balancer):
                pass

    assert type(create_balancer("static")) is StaticWeighting


def test_list_balancers_filter():
    assert list_balancers("s*") == ["static"]
    assert list_balancers("e*") == ["equal"]
    assert list_balancers("zzz*") == []
    assert {"equal", "static"} <= set(list_balancers())


def test_user_balancer_registered_and_used_by_the_module():
    name = f"test_max_{next(_counter)}"

    @register_balancer(name)
    class MaxLoss(Balancer):
        def forward(self, losses):
            return self.weighted_sum(losses, (losses.vector == losses.vector.max()).float())

    assert name in list_balancers() and MaxLoss.registry_name == name
    out = create_balancer(name)(losses(a=1.0, b=5.0))
    assert float(out.loss) == 5.0 and float(out.weights["a"]) == 0.0
    module = MultiTaskModule(MLPBackbone(4, hidden=(8,)), tasks(a=1.0, b=1.0), balancer=name)
    assert isinstance(module.balancer, MaxLoss)
    with pytest.raises(ValueError, match=rf"Balancer '{name}' does not use Task.weight"):
        MultiTaskModule(MLPBackbone(4, hidden=(8,)), tasks(a=1.0, b=0.5), balancer=name)


# --- a zero weight silences a task in training -------------------------------------------------------


def _two_task_module() -> MultiTaskModule:
    torch.manual_seed(0)
    return MultiTaskModule(
        MLPBackbone(4, hidden=(8,), dropout=0.0),
        [Task("off", kind="regression", weight=0.0), Task("on", kind="regression", weight=1.0)],
        lr=1e-2,
    )


def _data(n: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return {"x": x, "off": x.sum(1) * 10.0, "on": x[:, 0]}


def test_zero_weight_task_head_gets_zero_gradient():
    module = _two_task_module()
    task_losses, _ = module.shared_step(_data(), "train")
    assert float(task_losses["off"].detach()) > 0  # the task does have a loss ...
    module.balancer(task_losses).loss.backward()
    off = [p.grad for p in module.heads["off"].parameters()]
    on = [p.grad for p in module.heads["on"].parameters()]
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in off)  # ... that does not train its head
    assert all(g is not None and torch.count_nonzero(g) > 0 for g in on)
    # and the backbone's gradient is that of the weighted task alone
    backbone_grad = [p.grad.clone() for p in module.backbone.parameters()]
    module.zero_grad()
    module.shared_step(_data(), "train")[0]["on"].backward()
    assert all(
        torch.allclose(a, b) for a, b in zip(backbone_grad, (p.grad for p in module.backbone.parameters()))
    )


class _Rows(torch.utils.data.Dataset):
    def __init__(self, data: dict[str, torch.Tensor]) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data["x"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.data.items()}


class _GradRecorder(L.Callback):
    def __init__(self) -> None:
        self.grads: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append(
            {
                name: sum(float(p.grad.abs().sum()) for p in head.parameters())
                for name, head in pl_module.heads.items()
            }
        )


@pytest.mark.filterwarnings("ignore:.*no `val_dataloader`.*")
def test_zero_weight_task_is_ignored_by_training():
    module = _two_task_module()
    before = {k: v.clone() for k, v in module.heads["off"].state_dict().items()}
    before_on = {k: v.clone() for k, v in module.heads["on"].state_dict().items()}
    recorder = _GradRecorder()
    logger = RecordingLogger()
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    trainer.fit(module, DataLoader(_Rows(_data()), batch_size=8))
    assert len(recorder.grads) == 3
    assert all(g["off"] == 0.0 and g["on"] > 0.0 for g in recorder.grads)
    after = module.heads["off"].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # AdamW with zero gradients: no update
    assert any(not torch.equal(before_on[k], v) for k, v in module.heads["on"].state_dict().items())
    steps = [m for _, m in logger.history if "train/loss" in m]
    assert len(steps) == 3 and trainer.global_step == 3
    assert all(m["weights/off"] == 0.0 and m["weights/on"] == 1.0 for m in steps)


def test_balanced_takes_weights_as_a_tensor_or_a_dict():
    """A balancer of the earlier API returns ``Balanced(loss, {task: weight})``: the module still reads a
    dense vector from it (0 for a task it gave no weight), and the dense form reads back as a dict."""
    as_dict = Balanced(torch.tensor(3.0), {"a": torch.tensor(0.5)}, task_names=("a", "b"))
    assert as_dict.vector.tolist() == [0.5, 0.0] and list(as_dict.weights) == ["a"]
    losses = TaskLosses({"b": torch.tensor(2.0)}, ["a", "b"])
    dense = Balanced.of(losses, torch.tensor(2.0), torch.tensor([0.0, 1.5]))
    assert dense.weights == {"b": torch.tensor(1.5)} and torch.equal(dense.objective, dense.loss)
