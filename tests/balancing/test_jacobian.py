"""The Jacobian step behind every gradient method: its surrogate loss has exactly the aggregated gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.backbones import MLPBackbone
from lightning_mtl.balancing.base import StepContext
from lightning_mtl.balancing.gradient import GradientBalancer
from lightning_mtl.kinds import TaskLoss

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")

WEIGHTS = torch.tensor([0.3, 1.7], dtype=torch.float64)


class FixedWeights(GradientBalancer):
    """A linear test method: fixed weights, counting its calls."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.gram_calls = 0

    def weights_from_gram(self, gram: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        self.gram_calls += 1
        self.last_gram = gram
        return torch.where(present, WEIGHTS.to(gram), 0.0)


class SignFlip(GradientBalancer):
    """A non-linear test method: the negated sum (so the surrogate must carry an arbitrary direction)."""

    linear = False

    def aggregate(self, jacobian, present=None):
        d = -jacobian.sum(0)
        return d, self.implied_weights(jacobian, d)


TASKS = [Task("a", kind="regression"), Task("b", kind="binary", labels=["n", "y"])]


def make_module(balancer: GradientBalancer) -> tuple[MultiTaskModule, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    module = MultiTaskModule(MLPBackbone(5, hidden=(16, 8), dropout=0.0), TASKS, balancer=balancer)
    x = torch.randn(12, 5)
    batch = {"x": x, "a": x[:, 0] * 2, "b": (x[:, 1] > 0).float()}
    return module, batch


def reference_grads(module, batch, backbone_weights):
    """Gradients by plain autograd: backbone from sum_t w_t L_t, each head from its own loss."""
    module.zero_grad()
    losses, _ = module.shared_step(batch, "refresh")
    grads = {}
    total = sum(w * losses[n] for n, w in zip(("a", "b"), backbone_weights))
    bb = torch.autograd.grad(total, list(module.backbone.parameters()), retain_graph=True)
    for n in ("a", "b"):
        grads[n] = torch.autograd.grad(losses[n], list(module.heads[n].parameters()), retain_graph=True)
    return bb, grads


def surrogate_grads(module, batch):
    module.zero_grad()
    loss = module.training_step(batch, 0)
    loss.backward()
    bb = [p.grad.clone() for p in module.backbone.parameters()]
    heads = {n: [p.grad.clone() for p in module.heads[n].parameters()] for n in ("a", "b")}
    return bb, heads


@pytest.mark.parametrize("mode", ["params", "features"])
@pytest.mark.parametrize("jacobian", ["loop", "batched"])
def test_surrogate_carries_the_weighted_direction_and_heads_keep_their_own_gradient(mode, jacobian):
    module, batch = make_module(FixedWeights(mode=mode, jacobian=jacobian))
    want_bb, want_heads = reference_grads(module, batch, WEIGHTS.float().tolist())
    got_bb, got_heads = surrogate_grads(module, batch)
    for g, w in zip(got_bb, want_bb):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    for n in ("a", "b"):
        for g, w in zip(got_heads[n], want_heads[n]):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert module.balancer.gram_calls == 1


def test_params_gram_is_the_gram_of_the_per_task_parameter_gradients():
    module, batch = make_module(FixedWeights())
    losses, _ = module.shared_step(batch, "refresh")
    rows = []
    for n in ("a", "b"):
        g = torch.autograd.grad(losses[n], list(module.backbone.parameters()), retain_graph=True)
        rows.append(torch.cat([x.flatten() for x in g]))
    jac = torch.stack(rows)
    module.training_step(batch, 0)
    torch.testing.assert_close(module.balancer.last_gram, (jac @ jac.T).double(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["params", "features"])
def test_non_linear_direction_reaches_the_backbone(mode):
    module, batch = make_module(SignFlip(mode=mode))
    want_bb, want_heads = reference_grads(module, batch, [-1.0, -1.0])
    got_bb, got_heads = surrogate_grads(module, batch)
    for g, w in zip(got_bb, want_bb):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_heads["b"], want_heads["b"]):  # heads still descend their own loss
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_loss_scale_is_removed_before_the_method_sees_the_gradients():
    module, batch = make_module(FixedWeights())
    raw, _ = module.shared_step(batch, "train")
    losses = module.task_losses(raw)
    feats, params = module._step_features, module._task_parameters()
    ctx1 = StepContext(
        features=feats,
        backbone=module.backbone,
        loss_scale=torch.tensor(1.0),
        task_parameters=params,
        retain_graph=True,
    )
    out1 = module.balancer(losses, ctx1)
    gram1 = module.balancer.last_gram
    ctx2 = StepContext(
        features=feats,
        backbone=module.backbone,
        loss_scale=torch.tensor(2.0**16),
        amp_scaled=True,
        task_parameters=params,
    )
    out2 = module.balancer(losses, ctx2)
    torch.testing.assert_close(module.balancer.last_gram, gram1)
    g1 = torch.autograd.grad(out1.loss, list(module.backbone.parameters()), retain_graph=True)
    g2 = torch.autograd.grad(out2.loss, list(module.backbone.parameters()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_update_every_reuses_weights_without_a_jacobian():
    module, batch = make_module(FixedWeights(update_every=3))
    for _step in range(6):
        want_bb, want_heads = reference_grads(module, batch, WEIGHTS.float().tolist())
        got_bb, got_heads = surrogate_grads(module, batch)
        for g, w in zip(got_bb, want_bb):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        for n in ("a", "b"):
            for g, w in zip(got_heads[n], want_heads[n]):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert module.balancer.gram_calls == 2  # steps 0 and 3
    assert int(module.balancer.calls) == 6


def test_update_every_reuses_weights_when_the_present_tasks_change():
    """Which steps recompute depends on the step counter only (no host read of the tasks present); a task
    absent when the weights were computed gets the mean of the cached weights of the others."""
    module, batch = make_module(FixedWeights(update_every=3))
    module.training_step({"x": batch["x"], "a": batch["a"]}, 0)  # only a: its plain gradient, weight 1
    assert module.balancer.gram_calls == 1
    torch.testing.assert_close(module.balancer.cached_weights, torch.tensor([1.0, 0.0]))
    want_bb, want_heads = reference_grads(module, batch, [1.0, 1.0])  # b: the mean of the cached [1]
    got_bb, got_heads = surrogate_grads(module, batch)  # step 1: reused, both tasks present
    for g, w in zip(got_bb, want_bb):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    for n in ("a", "b"):
        for g, w in zip(got_heads[n], want_heads[n]):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert module.balancer.gram_calls == 1
    module.training_step(batch, 2)
    module.training_step(batch, 3)  # step 3: computed again, for both tasks
    assert module.balancer.gram_calls == 2
    torch.testing.assert_close(module.balancer.cached_weights.double(), WEIGHTS)


class OverflowOnce(FixedWeights):
    """NaN weights on its call number ``overflow``, as an fp16 overflow gives (a step the GradScaler skips)."""

    def __init__(self, overflow: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.overflow = overflow

    def weights_from_gram(self, gram, present=None):
        w = super().weights_from_gram(gram, present)
        return torch.full_like(w, torch.nan) if self.gram_calls == self.overflow else w


@pytest.mark.parametrize("overflow", [1, 2])
def test_overflowed_step_weights_are_not_cached_or_logged(monkeypatch, overflow):
    """An overflowed step's NaN weights are neither logged nor cached: the steps that reuse weights until the
    next computation take the last finite ones (or 1 per task, the plain gradients, before any)."""
    module, batch = make_module(OverflowOnce(overflow=overflow, update_every=2))
    logged: dict[str, float] = {}
    # what the loggers would receive on a logging step (every step here)
    monkeypatch.setattr(module, "_log_step", lambda *args: logged.update(module._step_metrics(*args)))
    monkeypatch.setattr(module, "_loss_scale", lambda: torch.tensor(2.0**10))  # an active GradScaler
    if overflow == 2:
        module.training_step(batch, 0)  # finite, cached
        module.training_step(batch, 1)  # reused
        logged.clear()
    module.training_step(batch, 2 * overflow - 2)  # the overflow
    assert module.balancer.gram_calls == overflow
    assert "weights/a" not in logged and "train/loss" in logged  # the skipped step's NaN is not logged
    module.training_step(batch, 2 * overflow - 1)  # reused, without a new computation
    assert module.balancer.gram_calls == overflow
    expected = WEIGHTS.tolist() if overflow == 2 else [1.0, 1.0]
    assert [logged["weights/a"], logged["weights/b"]] == pytest.approx(expected)


def test_absent_task_keeps_its_head_in_the_graph_with_zero_gradient():
    module, batch = make_module(FixedWeights())
    module.zero_grad()
    loss = module.training_step({"x": batch["x"], "a": batch["a"]}, 0)
    loss.backward()
    assert all(
        p.grad is not None and float(p.grad.abs().sum()) == 0.0 for p in module.heads["b"].parameters()
    )
    assert any(float(p.grad.abs().sum()) > 0 for p in module.backbone.parameters())


def head_grads(module, losses, names):
    return {
        n: torch.autograd.grad(losses[n], list(module.heads[n].parameters()), retain_graph=True)
        for n in names
    }


@pytest.mark.parametrize("mode", ["params", "features"])
@pytest.mark.parametrize("update_every", [1, 2])
def test_frozen_backbone_step_is_each_heads_own_gradient_with_weight_1(monkeypatch, mode, update_every):
    """Nothing shared trains: no Jacobian, no aggregation; each head gets its own task's gradient (the step of
    ``equal``) and every present task is logged with weight 1, also on the steps that would reuse weights."""
    module, batch = make_module(FixedWeights(mode=mode, update_every=update_every))
    module.backbone.requires_grad_(False)
    logged: dict[str, float] = {}
    monkeypatch.setattr(module, "_log_step", lambda *args: logged.update(module._step_metrics(*args)))
    for step, part in enumerate([batch, {"x": batch["x"], "a": batch["a"]}, batch]):
        module.zero_grad()
        losses, _ = module.shared_step(part, "refresh")
        want = head_grads(module, losses, list(losses))
        module.training_step(part, step).backward()
        for n, grads in want.items():
            for p, g in zip(module.heads[n].parameters(), grads):
                torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-7)
        assert all(p.grad is None for p in module.backbone.parameters())
        expected = {"weights/a": 1.0, "weights/b": 1.0} if "b" in part else {"weights/a": 1.0}
        assert {k: v for k, v in logged.items() if k.startswith("weights/")} == expected
        logged.clear()
    assert module.balancer.gram_calls == 0  # the method never ran
    assert module.balancer.step_count == 3


def test_db_mtl_heads_keep_the_gradient_of_the_log_loss_when_the_backbone_is_frozen():
    from lightning_mtl.balancing import DBMTL

    module, batch = make_module(DBMTL())
    module.backbone.requires_grad_(False)
    losses, _ = module.shared_step(batch, "refresh")
    want = head_grads(module, {n: torch.log(v + 1e-8) for n, v in losses.items()}, ["a", "b"])
    module.zero_grad()
    module.training_step(batch, 0).backward()
    for n in ("a", "b"):
        for p, g in zip(module.heads[n].parameters(), want[n]):
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    assert module.balancer.grad_ema.shape[1] == 0  # no Jacobian was taken


@pytest.mark.parametrize("mode", ["params", "features"])
def test_partially_frozen_backbone_aggregates_over_the_trainable_shared_parameters(mode):
    module, batch = make_module(FixedWeights(mode=mode))
    first = module.backbone.net[0]
    first.requires_grad_(False)
    trainable = [p for p in module.backbone.parameters() if p.requires_grad]
    module.zero_grad()
    losses, _ = module.shared_step(batch, "refresh")
    total = sum(w * losses[n] for n, w in zip(("a", "b"), WEIGHTS.float().tolist()))
    want = torch.autograd.grad(total, trainable, retain_graph=True)
    want_heads = head_grads(module, losses, ["a", "b"])
    module.training_step(batch, 0).backward()
    for p, g in zip(trainable, want):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
    for n in ("a", "b"):
        for p, g in zip(module.heads[n].parameters(), want_heads[n]):
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in first.parameters())
    assert module.balancer.gram_calls == 1


def test_memory_budget_warning_names_the_fix():
    module, batch = make_module(FixedWeights(memory_budget_mb=1e-4))
    with pytest.warns(UserWarning, match=r"2 x \d+ per-task gradient matrix.*mode='features'"):
        module.training_step(batch, 0)


def test_rejects_bad_options():
    with pytest.raises(ValueError, match="mode must be one of"):
        FixedWeights(mode="weights")
    with pytest.raises(ValueError, match="update_every must be 1"):
        SignFlip(update_every=2)
    with pytest.raises(ValueError, match="jacobian must be one of"):
        FixedWeights(jacobian="vmap")
    with pytest.raises(ValueError, match="needs the step's StepContext"):
        FixedWeights()({"a": torch.tensor(1.0)})


def test_head_only_task_parameters_include_loss_modules():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.tensor(1.0))

        def forward(self, x, y):
            return self.s * nn.functional.mse_loss(x, y)

    module, batch = make_module(FixedWeights())
    unit = module.units["a"]
    unit.loss_module = Scaled()
    unit.loss_fn = TaskLoss(unit.loss_module)  # reduces itself: given the labelled elements
    module.zero_grad()
    module.training_step(batch, 0).backward()
    assert unit.loss_module.s.grad is not None and float(unit.loss_module.s.grad) != 0.0


def test_gradient_matrix_workspace_is_reused_and_not_checkpointed():
    module, batch = make_module(FixedWeights())
    module.training_step(batch, 0)
    first = module.balancer._workspace
    assert first is not None and first.shape[0] == 2
    module.training_step(batch, 1)
    assert module.balancer._workspace is first  # the same memory, rewritten
    assert not any("workspace" in key for key in module.state_dict())
    features, _ = make_module(FixedWeights(mode="features"))
    features.training_step(batch, 0)
    features.training_step({k: v[:5] for k, v in batch.items()}, 1)  # a smaller batch: a new matrix
    assert features.balancer._workspace.shape == (2, 5 * 8)


def test_single_task_direction_does_not_alias_the_workspace():
    module, batch = make_module(FixedWeights())
    raw, _ = module.shared_step({"x": batch["x"], "a": batch["a"]}, "train")
    ctx = StepContext(
        features=module._step_features,
        backbone=module.backbone,
        loss_scale=torch.tensor(1.0),
        task_parameters=module._task_parameters(),
    )
    out = module.balancer(module.task_losses(raw), ctx)
    module.balancer._workspace.fill_(float("nan"))  # the next step rewrites it before this backward
    grads = torch.autograd.grad(out.loss, list(module.backbone.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
