"""Transfer learning: add_task on a trained module, freezing, fine-tuning on the new task only, reloading."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TABULAR_TASKS, DictDataset, fit, toy_tabular
from torch.utils.data import DataLoader

from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.backbones import MLPBackbone
from lightning_mtl.balancing import create_balancer, list_balancers
from lightning_mtl.balancing.base import BALANCER_REGISTRY
from lightning_mtl.balancing.gradient import MODES, GradientBalancer
from lightning_mtl.balancing.static import StaticWeighting
from lightning_mtl.hub import from_pretrained, save_pretrained

OLD = ["risk", "stay"]
NEW_LABELS = ["a", "b", "c"]


def new_task(**kwargs) -> Task:
    return Task("new", kind="multiclass", labels=NEW_LABELS, **kwargs)


def build(**kwargs) -> MultiTaskModule:
    torch.manual_seed(0)
    return MultiTaskModule(
        MLPBackbone(8, hidden=(32,), dropout=0.0), [TABULAR_TASKS[0], TABULAR_TASKS[3]], lr=1e-2, **kwargs
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train fastest on one thread (and far faster than on two when the CPU is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained_state(one_thread) -> dict[str, torch.Tensor]:
    """Weights of the two-task module (risk, stay) after a short training run."""
    module = build()
    data = {k: v for k, v in toy_tabular(256).items() if k in ("x", *OLD)}
    fit(module, DataLoader(DictDataset(data), batch_size=64, shuffle=True), steps=40)
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.fixture
def trained(trained_state) -> MultiTaskModule:
    module = build()
    module.load_state_dict(trained_state)
    return module


def build_trained_like(module: MultiTaskModule) -> MultiTaskModule:
    other = build()
    other.load_state_dict(
        {k: v for k, v in module.state_dict().items() if not k.startswith("units.new.head.")}
    )
    return other


def new_data(n: int = 256, seed: int = 1) -> dict[str, torch.Tensor]:
    """Only the inputs and the new task's labels: the old tasks' targets are absent (masked)."""
    data = toy_tabular(n, seed=seed)
    return {"x": data["x"], "new": data["group"]}


def new_loss(module: MultiTaskModule, batch: dict[str, torch.Tensor]) -> float:
    was_training = module.training
    module.eval()
    with torch.no_grad():
        losses, _ = module.shared_step(batch, "test")
    module.train(was_training)
    return float(losses["new"])


def snapshot(module: MultiTaskModule, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if k.startswith(prefix)}


def unchanged(before: dict[str, torch.Tensor], module: MultiTaskModule) -> bool:
    state = module.state_dict()
    return bool(before) and all(torch.equal(v, state[k]) for k, v in before.items())


def fine_tune(module: MultiTaskModule, steps: int = 60):
    return fit(module, DataLoader(DictDataset(new_data()), batch_size=64, shuffle=True), steps=steps)


@pytest.mark.parametrize("freeze", [True, "all", "backbone", False])
def test_add_task_fine_tunes_the_new_head(trained, freeze):
    old_backbone = snapshot(trained, "backbone.")
    old_heads = {n: snapshot(trained, f"units.{n}.head.") for n in OLD}
    trained.add_task(new_task(), freeze=freeze)
    assert list(trained.tasks) == [*OLD, "new"]
    new_head = snapshot(trained, "units.new.head.")
    held_out = new_data(128, seed=7)
    before = new_loss(trained, held_out)

    trainer = fine_tune(trained)

    after = new_loss(trained, held_out)
    assert after < 0.7 * before, (before, after)
    assert not unchanged(new_head, trained)  # the new head trained
    # the old tasks had no labels all along: their epoch metrics are NaN, not a crash (AUROC has no samples)
    assert math.isnan(float(trainer.callback_metrics["train/risk/auroc"]))
    assert float(trainer.callback_metrics["train/new/accuracy"]) > 0.5
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    old_head_params = [p for n in OLD for p in trained.heads[n].parameters()]
    if freeze in (True, "all"):
        assert unchanged(old_backbone, trained)
        assert all(unchanged(old_heads[n], trained) for n in OLD)
        assert not any(p.requires_grad for p in trained.backbone.parameters())
        assert not any(p.requires_grad for p in old_head_params)
        assert optimized == {id(p) for p in trained.heads["new"].parameters()}
    elif freeze == "backbone":
        assert unchanged(old_backbone, trained)
        assert not any(p.requires_grad for p in trained.backbone.parameters())
        assert all(p.requires_grad and id(p) in optimized for p in old_head_params)  # old heads still train
    else:
        assert not unchanged(old_backbone, trained)
        assert all(p.requires_grad for p in trained.parameters())


def test_checkpoint_after_add_task_reloads_weights_only(trained, tmp_path):
    trained.add_task(new_task(), freeze=True)
    trainer = fine_tune(trained, steps=5)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = MultiTaskModule.load_from_checkpoint(path, weights_only=True)
    assert list(loaded.tasks) == [*OLD, "new"]
    assert loaded.tasks["new"] == trained.tasks["new"]
    x = toy_tabular(16, seed=3)["x"]
    assert loaded.predict(x) == trained.predict(x)
    assert set(loaded.predict(x)) == {*OLD, "new"}


def test_hub_round_trip_keeps_the_new_task(trained, tmp_path):
    trained.add_task(new_task(head="mlp", head_kwargs={"hidden": 16}))
    path = save_pretrained(trained, tmp_path / "artifact")
    loaded = from_pretrained(path)
    assert list(loaded.tasks) == [*OLD, "new"]
    assert loaded.tasks["new"] == trained.tasks["new"]
    x = toy_tabular(16, seed=3)["x"]
    assert loaded.predict(x) == trained.predict(x)


def test_predict_returns_the_new_task_with_its_labels(trained):
    trained.add_task(new_task())
    preds = trained.predict(toy_tabular(5, seed=3)["x"])
    assert set(preds) == {*OLD, "new"}
    assert len(preds["new"]) == 5
    assert all(p["label"] in NEW_LABELS for p in preds["new"])
    assert set(preds["new"][0]["probabilities"]) == set(NEW_LABELS)
    # the old tasks' predictions are those of the trained module
    assert preds["risk"] == build_trained_like(trained).predict(toy_tabular(5, seed=3)["x"])["risk"]


def test_duplicate_name_and_bad_freeze_raise_and_change_nothing(trained):
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    with pytest.raises(ValueError, match="already exists"):
        trained.add_task(Task("risk", kind="binary", labels=["no", "yes"]))
    with pytest.raises(ValueError, match="already exists"):
        trained.add_task({"name": "stay", "kind": "regression"})
    with pytest.raises(ValueError, match="freeze must be"):
        trained.add_task(new_task(), freeze="heads")
    assert list(trained.tasks) == OLD and list(trained.heads) == OLD
    assert [t["name"] for t in trained.hparams["tasks"]] == OLD
    assert list(trained.units) == OLD
    assert trained.state_dict().keys() == state.keys()
    assert all(p.requires_grad for p in trained.parameters())


def test_add_task_from_dict_builds_loss_metrics_and_loss_means_for_every_stage(trained):
    trained.add_task(new_task().to_dict())
    assert isinstance(trained.tasks["new"], Task)
    for stage in ("train", "val", "test"):
        assert set(trained.units["new"].collection(stage)) == set(new_task().build_metrics())
        assert trained.units["new"].loss_mean(stage).update_count == 0
    batch = new_data(32)
    with torch.no_grad():
        losses, _ = trained.shared_step(batch, "val")
    assert set(losses) == {"new"}  # tasks without targets in the batch are left out
    assert float(losses["new"]) > 0
    assert float(trained.units["new"].loss_mean("val").compute()) == pytest.approx(float(losses["new"]))
    assert 0.0 <= float(trained.units["new"].collection("val").compute()["accuracy"]) <= 1.0
    assert trained.hparams["tasks"][-1] == new_task().to_dict()


def test_static_balancer_picks_up_the_new_weight(trained):
    trained.add_task(new_task(weight=3.0))
    assert trained.balancer.task_names == [*OLD, "new"]
    balanced = trained.balancer(
        {"risk": torch.tensor(1.0), "stay": torch.tensor(1.0), "new": torch.tensor(2.0)}
    )
    assert float(balanced.loss) == pytest.approx(8.0)
    assert float(balanced.weights["new"]) == 3.0


def test_failed_balancer_setup_leaves_the_module_unchanged():
    torch.manual_seed(0)
    module = MultiTaskModule(
        MLPBackbone(8, hidden=(16,)),
        [TABULAR_TASKS[0], TABULAR_TASKS[3]],
        balancer=StaticWeighting({"risk": 1.0, "stay": 2.0}),
    )
    with pytest.raises(ValueError, match="missing"):
        module.add_task(new_task())
    assert list(module.tasks) == OLD and list(module.heads) == OLD
    assert [t["name"] for t in module.hparams["tasks"]] == OLD
    assert module.balancer.task_names == OLD
    balanced = module.balancer({"risk": torch.tensor(1.0), "stay": torch.tensor(1.0)})
    assert float(balanced.loss) == pytest.approx(3.0)


def test_new_modules_follow_the_module_dtype(trained):
    trained.to(torch.float64)
    trained.add_task(new_task(), freeze="backbone")
    assert {p.dtype for p in trained.heads["new"].parameters()} == {torch.float64}
    assert {p.device for p in trained.heads["new"].parameters()} == {trained.device}
    preds = trained.predict(toy_tabular(4, seed=3)["x"].double())
    assert len(preds["new"]) == 4


def test_feature_dim_sizes_the_new_head():
    torch.manual_seed(0)
    module = MultiTaskModule(torch.nn.Sequential(torch.nn.Linear(8, 6)), [TABULAR_TASKS[0]], feature_dim=6)
    module.add_task(new_task())
    assert module.heads["new"](torch.zeros(2, 6)).shape == (2, 3)


def test_remove_task(trained, tmp_path):
    trained.add_task(new_task())
    x = toy_tabular(8, seed=3)["x"]
    expected = trained.predict(x)
    trained.remove_task("stay")
    assert list(trained.tasks) == ["risk", "new"] and list(trained.heads) == ["risk", "new"]
    assert trained.balancer.task_names == ["risk", "new"]
    assert not any(k.startswith("units.stay.head.") for k in trained.state_dict())
    assert "stay" not in trained.units
    loaded = from_pretrained(save_pretrained(trained, tmp_path / "artifact"))
    assert list(loaded.tasks) == ["risk", "new"]
    assert loaded.predict(x) == {k: v for k, v in expected.items() if k != "stay"}
    with pytest.raises(KeyError, match="No task"):
        trained.remove_task("stay")
    trained.remove_task("new")
    with pytest.raises(ValueError, match="at least one"):
        trained.remove_task("risk")


def test_freeze_all_but(trained):
    trained.freeze_all_but(["stay"])
    trainable = {n for n, p in trained.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("units.stay.head.") for n in trainable)
    assert trainable == {f"units.stay.head.{n}" for n, _ in trained.heads["stay"].named_parameters()}
    with pytest.raises(KeyError, match="Unknown task"):
        trained.freeze_all_but(["nope"])


# --- transfer with a gradient balancer ------------------------------------------------------------------
def gradient_variants() -> list[tuple[str, str]]:
    """Every registered gradient method with every ``mode`` it supports (a new method is tested for free)."""
    out = []
    for name in list_balancers():
        cls = BALANCER_REGISTRY.get(name)
        if name.startswith("doc_") or not issubclass(cls, GradientBalancer):
            continue
        out += [(name, mode) for mode in MODES if mode == "params" or cls.supports_features]
    return out


def all_data(n: int = 64, seed: int = 1) -> dict[str, torch.Tensor]:
    """Inputs with labels for the old tasks and the new one, so that several tasks meet in every step."""
    data = toy_tabular(n, seed=seed)
    return {"x": data["x"], "risk": data["risk"], "stay": data["stay"], "new": data["group"]}


@pytest.mark.parametrize("freeze", [True, "backbone"])
@pytest.mark.parametrize(
    ("name", "mode"), gradient_variants(), ids=[f"{n}-{m}" for n, m in gradient_variants()]
)
def test_gradient_balancer_trains_a_task_added_with_a_frozen_backbone(name, mode, freeze):
    module = build(balancer=create_balancer({"name": name, "mode": mode}))
    old_data = {k: v for k, v in all_data(seed=2).items() if k != "new"}
    fit(module, DataLoader(DictDataset(old_data), batch_size=32), steps=2)  # trained with it
    module.add_task(new_task(), freeze=freeze)
    backbone = snapshot(module, "backbone.")
    old_heads = {n: snapshot(module, f"units.{n}.head.") for n in OLD}
    new_head = snapshot(module, "units.new.head.")

    trainer = fit(module, DataLoader(DictDataset(all_data()), batch_size=32), steps=3)

    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert not unchanged(new_head, module)  # the new head trained
    assert unchanged(backbone, module)  # bitwise: the frozen backbone got no update
    for n in OLD:  # freeze=True: the old heads are frozen too; "backbone": they keep training
        assert unchanged(old_heads[n], module) == (freeze is True), n
    assert module.balancer.step_count == 5


def loss_weighting_names() -> list[str]:
    return [
        n
        for n in list_balancers()
        if not n.startswith("doc_") and not issubclass(BALANCER_REGISTRY.get(n), GradientBalancer)
    ]


@pytest.mark.parametrize("freeze", [True, "backbone"])
@pytest.mark.parametrize("name", loss_weighting_names())
def test_loss_weighting_with_a_frozen_backbone_trains_or_is_refused_at_add_task(name, freeze):
    module = build(balancer=name)
    if BALANCER_REGISTRY.get(
        name
    ).needs_shared_gradients:  # GradNorm: nothing to measure without a shared net
        with pytest.raises(
            ValueError, match=rf"add_task\('new', freeze={freeze!r}\).*'{name}'.*set_balancer"
        ):
            module.add_task(new_task(), freeze=freeze)
        assert list(module.tasks) == OLD and all(p.requires_grad for p in module.parameters())
        module.set_balancer("equal")  # the fix the error names
        module.add_task(new_task(), freeze=freeze)
    else:
        module.add_task(new_task(), freeze=freeze)
    new_head = snapshot(module, "units.new.head.")
    backbone = snapshot(module, "backbone.")
    trainer = fit(module, DataLoader(DictDataset(all_data()), batch_size=32), steps=3)
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert not unchanged(new_head, module) and unchanged(backbone, module)


def test_set_balancer_swaps_records_and_round_trips(trained, tmp_path):
    trained.set_balancer("pcgrad")
    assert type(trained.balancer).__name__ == "PCGrad" and trained.hparams["balancer"] == "pcgrad"
    old_data = {k: v for k, v in all_data().items() if k != "new"}
    trainer = fit(trained, DataLoader(DictDataset(old_data), batch_size=32), steps=2)
    assert trained.balancer.step_count == 2
    trained.set_balancer({"name": "equal"})  # pcgrad -> equal
    assert type(trained.balancer).__name__ == "EqualWeighting"
    assert trained.hparams["balancer"] == {"name": "equal"}
    assert trained.balancer.task_names == OLD
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    assert (
        type(MultiTaskModule.load_from_checkpoint(path, weights_only=True).balancer).__name__
        == "EqualWeighting"
    )

    trained.set_balancer(create_balancer({"name": "pcgrad", "mode": "features"}))  # and back, as an instance
    assert trained.balancer.step_count == 0  # the step state starts again
    assert trained.hparams["balancer"]["init_args"]["mode"] == "features"
    loaded = from_pretrained(save_pretrained(trained, tmp_path / "artifact"))
    assert type(loaded.balancer).__name__ == "PCGrad" and loaded.balancer.mode == "features"
    assert loaded.balancer.task_names == OLD
    x = toy_tabular(8, seed=3)["x"]
    assert loaded.predict(x) == trained.predict(x)


def test_set_balancer_resets_an_instances_step_state_and_follows_the_device_and_tasks(trained):
    balancer = create_balancer("rlw")
    balancer.setup([Task("other", kind="regression")])
    balancer.set_step_count(7)
    trained.add_task(new_task())
    trained.set_balancer(balancer)
    assert trained.balancer is balancer
    assert balancer.step_count == 0 and int(balancer.calls) == 0
    assert balancer.task_names == [*OLD, "new"]
    assert balancer.calls.device == trained.device


def test_set_balancer_failures_leave_the_module_unchanged(trained):
    before = trained.balancer
    with pytest.raises(ValueError, match="missing"):
        trained.set_balancer(StaticWeighting({"risk": 1.0}))
    trained.freeze_all_but(["stay"])
    with pytest.raises(
        ValueError,
        match=r"set_balancer\('gradnorm'\): every backbone parameter is frozen, but balancer 'gradnorm' "
        r"\(GradNorm\).*module.unfreeze\(\)",
    ):
        trained.set_balancer("gradnorm")
    assert trained.balancer is before and trained.hparams["balancer"] is None
    trained.unfreeze()
    trained.set_balancer("gradnorm")
    with pytest.raises(
        ValueError, match=r"freeze_all_but\(\['stay'\]\) freezes the whole backbone.*'gradnorm'"
    ):
        trained.freeze_all_but(["stay"])
    assert all(p.requires_grad for p in trained.parameters())
