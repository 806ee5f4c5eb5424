"""The training step reads nothing from the device: no ``.item()``/``int()``/``bool()`` of a tensor, no
``.tolist()``, no boolean-mask indexing (``aten::nonzero``), for every kind and every balancer, with missing
labels in the batch. On a GPU each such read stalls the step; on CPU they are caught here by intercepting
the two aten ops every one of them goes through."""

from __future__ import annotations

import collections
import traceback

import pytest
import torch
from conftest import TABULAR_TASKS, ToyConvBackbone, ToyTokenBackbone, balancer_variants, toy_tabular
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.backbones import MLPBackbone
from lightning_mtl.balancing import create_balancer

HOST_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default)
# Aligned-MTL's eigendecomposition checks its error code on the host (torch.linalg.eigh has no _ex form).
ALLOWED = {"aligned_mtl": 1}


class HostReads(TorchDispatchMode):
    """Counts the ops that copy a device value to the host, with where they came from."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in HOST_READS:
            frames = [f for f in traceback.extract_stack()[:-1] if "lightning_mtl" in f.filename]
            where = frames[-1] if frames else traceback.extract_stack()[-3]
            self.sites[
                f"{func.__name__} at {where.filename.split('/')[-1]}:{where.lineno} ({where.name})"
            ] += 1
        return func(*args, **(kwargs or {}))

    @property
    def count(self) -> int:
        return sum(self.sites.values())


def tabular_batch() -> dict[str, torch.Tensor]:
    """Every tabular kind, each with a missing label somewhere, and one task missing from a whole row."""
    data = {k: v[:16].clone() for k, v in toy_tabular(16).items()}
    data["risk"][0] = float("nan")
    data["group"][1] = -100
    data["flags"][2, 1] = float("nan")
    data["stay"][3:] = float("nan")
    return data


def steady_step(module: MultiTaskModule, batch, steps: int = 3) -> HostReads:
    """Run the checked batches first (they read label values on purpose), then count the next steps."""
    module.train()
    for i in range(module.check_batches + 1):
        module.training_step(batch, i + 1).backward()
    module.zero_grad()
    spy = HostReads()
    with spy:
        for i in range(steps):
            loss = module.training_step(batch, module.check_batches + 2 + i)
            loss.backward()
    return spy


@pytest.fixture(autouse=True)
def _no_trainer_log(monkeypatch):
    # without a Trainer, self.log only warns; silence it so that the counts are about the step itself
    monkeypatch.setattr(MultiTaskModule, "log", lambda *a, **k: None)


@pytest.mark.parametrize(("name", "kwargs"), balancer_variants(), ids=lambda v: str(v))
def test_every_balancer_steps_without_host_reads(name, kwargs):
    torch.manual_seed(0)
    balancer = create_balancer({"name": name, **kwargs})
    module = MultiTaskModule(
        MLPBackbone(8, hidden=(16,), dropout=0.0), TABULAR_TASKS, balancer=balancer, train_metrics=False
    )
    spy = steady_step(module, tabular_batch())
    assert spy.count <= 3 * ALLOWED.get(name, 0), dict(spy.sites)


@pytest.mark.parametrize(
    ("name", "kwargs"), [("pcgrad", {}), ("mgda_ub", {}), ("nash_mtl", {"update_every": 2})]
)
def test_gradient_step_with_a_frozen_backbone_reads_nothing(name, kwargs):
    """A frozen backbone is seen from ``requires_grad`` flags (host metadata): the plain per-head step reads
    nothing back either."""
    torch.manual_seed(0)
    module = MultiTaskModule(
        MLPBackbone(8, hidden=(16,), dropout=0.0),
        TABULAR_TASKS,
        balancer=create_balancer({"name": name, **kwargs}),
        train_metrics=False,
    )
    module.backbone.requires_grad_(False)
    spy = steady_step(module, tabular_batch())
    assert spy.count == 0, dict(spy.sites)
    assert module.balancer.step_count == module.check_batches + 4


@pytest.mark.parametrize("kind", ["token", "dense"])
def test_token_and_dense_kinds_step_without_host_reads(kind):
    torch.manual_seed(0)
    if kind == "token":
        backbone, key = ToyTokenBackbone(), "input_ids"
        inputs = torch.randint(1, 20, (4, 6))
        target = inputs % 3
        target[:, -2:] = -100
    else:
        backbone, key = ToyConvBackbone(), "image"
        inputs = torch.randn(4, 1, 8, 8)
        target = (inputs[:, 0] > 0).long()
        target[0] = -100
    module = MultiTaskModule(backbone, [Task("t", kind=kind, labels=["a", "b", "c"])], train_metrics=False)
    spy = steady_step(module, {key: inputs, "t": target})
    assert spy.count == 0, dict(spy.sites)


def test_training_metrics_read_the_device_only_on_their_steps():
    """With train metrics on (every N-th batch), the steps in between stay free of host reads."""
    torch.manual_seed(0)
    module = MultiTaskModule(MLPBackbone(8, hidden=(16,)), TABULAR_TASKS, train_metrics_every=4)
    batch = tabular_batch()
    steady_step(module, batch, steps=0)
    counts = []
    for batch_idx in range(20, 28):
        spy = HostReads()
        with spy:
            module.training_step(batch, batch_idx).backward()
        counts.append(spy.count)
    assert [c > 0 for c in counts] == [i % 4 == 0 for i in range(20, 28)], counts
    updated = {n: next(iter(module.units[n].collection("train").values())).update_count for n in module.tasks}
    assert all(v >= 2 for k, v in updated.items() if k != "stay"), updated  # batches 20 and 24 (and earlier)


def test_value_checks_run_on_the_first_batches_only():
    """A bad class id in a batch after the checked ones is not looked for (that would read the device)."""
    torch.manual_seed(0)
    module = MultiTaskModule(MLPBackbone(8, hidden=(16,)), TABULAR_TASKS, check_inputs=2, train_metrics=False)
    batch = tabular_batch()
    bad = {**batch, "group": torch.full((16,), 7)}
    with pytest.raises(ValueError, match="class id 7 is out of range for 3 classes"):
        module.shared_step(bad, "train")
    module.shared_step(batch, "train")  # the second checked batch
    spy = HostReads()
    with spy:
        module.shared_step(batch, "train")
    assert spy.count == 0
    # shapes are still checked on every batch (they are host metadata)
    with pytest.raises(ValueError, match=r"Task 'risk', target key 'risk': expected shape \[batch\]"):
        module.shared_step({**batch, "risk": torch.zeros(16, 2)}, "train")
    with pytest.raises(ValueError, match="check_inputs must be"):
        MultiTaskModule(MLPBackbone(8), TABULAR_TASKS, check_inputs=-1)
    with pytest.raises(ValueError, match="train_metrics_every must be"):
        MultiTaskModule(MLPBackbone(8), TABULAR_TASKS, train_metrics_every=0)
