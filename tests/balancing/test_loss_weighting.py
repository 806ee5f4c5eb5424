"""Loss-weighting balancers: uncertainty, DWA, RLW, GLS, FAMO, GradNorm (maths, absent tasks, state, specs)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_mtl import Task
from lightning_mtl.balancing import (
    FAMO,
    Balancer,
    DynamicWeightAverage,
    GeometricLossStrategy,
    GradNorm,
    RandomLossWeighting,
    UncertaintyWeighting,
    create_balancer,
)
from lightning_mtl.balancing.base import StepContext

NAMES = ["uncertainty", "dwa", "rlw", "gls", "famo", "gradnorm"]


def tasks(*names: str, **weights: float) -> list[Task]:
    return [Task(n, kind="regression", weight=weights.get(n, 1.0)) for n in names]


def built(name: str, *task_names: str, **kwargs) -> Balancer:
    balancer = create_balancer({"name": name, **kwargs})
    balancer.setup(tasks(*(task_names or ("a", "b", "c"))))
    return balancer


def step_inputs(
    scales: dict[str, float], loss_scale: float = 1.0, seed: int = 0
) -> tuple[dict[str, torch.Tensor], StepContext, nn.Module]:
    """Losses ``L_t = scale_t * mean(softplus(f) + 1)`` of a shared feature ``f = backbone(x)`` (all positive)."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4))
    feats = backbone(torch.randn(5, 3))
    losses = {
        n: s * (nn.functional.softplus(feats[:, i % 4]) + 1.0).mean()
        for i, (n, s) in enumerate(scales.items())
    }
    context = StepContext(features=[feats], backbone=backbone, loss_scale=torch.tensor(loss_scale))
    return losses, context, backbone


def train_step(balancer: Balancer, scales: dict[str, float], seed: int) -> dict[str, float]:
    """What the module does in one step: forward, backward + SGD on the balancer's parameters, counter,
    post-step losses (the 'after' losses are 10% lower for the first task)."""
    losses, context, _ = step_inputs(scales, seed=seed)
    out = balancer(losses, context)
    out.loss.backward()
    with torch.no_grad():
        for p in balancer.parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad)
                p.grad = None
    balancer.count_step()
    if balancer.needs_post_step_losses:
        before = {k: v.detach() for k, v in losses.items()}
        after = {k: v * (0.9 if i == 0 else 1.0) for i, (k, v) in enumerate(before.items())}
        balancer.after_step(before, after)
    balancer.on_train_epoch_end()
    return {k: float(v) for k, v in out.weights.items()} | {"loss": float(out.loss.detach())}


# --- every method ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("present", [["b"], ["a", "c"], ["a", "b", "c"]])
def test_absent_tasks(name, present):
    balancer = built(name)
    for seed in range(2):  # a second step exercises the state built by the first
        scales = {n: float(i + 1) for i, n in enumerate(present)}
        losses, context, backbone = step_inputs(scales, seed=seed)
        out = balancer(losses, context)
        assert set(out.weights) == set(present)
        assert out.loss.dim() == 0 and torch.isfinite(out.loss)
        assert all(w.dtype == torch.float32 and not w.requires_grad for w in out.weights.values())
        out.loss.backward()
        grads = [p.grad for p in backbone.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        if name != "gradnorm":  # (GradNorm's total also holds the gradient-norm term of its weights)
            # The backbone's gradient is sum_t weight_t * dL_t: the logged weights are the ones used.
            losses2, _, backbone2 = step_inputs(scales, seed=seed)
            torch.autograd.backward(
                sum(out.weights[n] * losses2[n] for n in present), inputs=list(backbone2.parameters())
            )
            for g, p in zip(grads, backbone2.parameters()):
                torch.testing.assert_close(g, p.grad)
        balancer.count_step()


@pytest.mark.parametrize("name", NAMES)
def test_single_task_weight(name):
    balancer = built(name)
    losses, context, _ = step_inputs({"c": 2.0})
    out = balancer(losses, context)
    expected = {"uncertainty": 0.5, "dwa": 1.0, "gls": 1.0, "famo": 1.0, "gradnorm": 1.0}
    if name == "rlw":
        assert 0.0 < float(out.weights["c"]) < 1.0
    else:
        assert float(out.weights["c"]) == pytest.approx(expected[name])


@pytest.mark.parametrize("name", NAMES)
def test_bf16_losses_are_computed_in_float32(name):
    balancer = built(name, "a", "b")
    losses, context, _ = step_inputs({"a": 1.0, "b": 3.0})
    out = balancer({k: v.bfloat16() for k, v in losses.items()}, context)
    assert out.loss.dtype == torch.float32
    assert all(w.dtype == torch.float32 for w in out.weights.values())


@pytest.mark.parametrize("name", NAMES)
def test_task_weights_are_rejected(name):
    with pytest.raises(ValueError, match=rf"Balancer '{name}' does not use Task.weight.*'b': 2.0"):
        create_balancer(name).setup(tasks("a", "b", b=2.0))


@pytest.mark.parametrize(
    ("name", "cls", "init_args"),
    [
        ("uncertainty", UncertaintyWeighting, {}),
        ("dwa", DynamicWeightAverage, {"temperature": 3.0}),
        ("rlw", RandomLossWeighting, {"seed": 7}),
        ("gls", GeometricLossStrategy, {}),
        ("famo", FAMO, {"w_lr": 0.05, "gamma": 0.01, "min_losses": {"a": 0.1}, "eps": 1e-6}),
        ("gradnorm", GradNorm, {"alpha": 0.5, "layer": "1."}),
    ],
)
def test_create_and_spec_round_trip(name, cls, init_args):
    assert type(create_balancer(name)) is cls
    assert cls.registry_name == name
    balancer = create_balancer({"name": name, **init_args})
    spec = balancer.spec()
    assert spec["class_path"] == f"{cls.__module__}.{cls.__qualname__}"
    assert {k: v for k, v in spec["init_args"].items() if k in init_args} == init_args
    rebuilt = create_balancer(spec)
    assert type(rebuilt) is cls and rebuilt.config() == balancer.config()
    exported = create_balancer(
        {"class_path": f"lightning_mtl.balancing.{cls.__name__}", "init_args": init_args}
    )
    assert type(exported) is cls and exported.spec() == spec


@pytest.mark.parametrize("name", ["uncertainty", "dwa", "rlw", "famo", "gradnorm"])
def test_state_dict_resume_continues_identically(name):
    scales = {"a": 1.0, "b": 4.0, "c": 0.5}
    original = built(name)
    for seed in range(3):
        train_step(original, scales, seed)
    resumed = built(name)
    resumed.load_state_dict(original.state_dict())
    for seed in range(3, 5):
        assert train_step(resumed, scales, seed) == train_step(original, scales, seed)


@pytest.mark.parametrize("name", NAMES)
def test_setup_again_rebuilds_the_state(name):
    balancer = built(name, "a", "b")
    train_step(balancer, {"a": 1.0, "b": 2.0}, seed=0)
    balancer.setup(tasks("x", "y", "z"))
    for key, value in balancer.state_dict().items():
        if key != "calls":
            assert value.shape[-1] == 3, key
    out = balancer(*step_inputs({"x": 1.0, "z": 2.0})[:2])
    assert set(out.weights) == {"x", "z"}


# --- uncertainty ---------------------------------------------------------------------------------------


def test_uncertainty_formula_and_learning():
    balancer = built("uncertainty", "a", "b")
    with torch.no_grad():
        balancer.log_vars.copy_(torch.tensor([0.5, -1.0]))
    losses = {"a": torch.tensor(10.0, requires_grad=True), "b": torch.tensor(0.1, requires_grad=True)}
    out = balancer(losses)
    s = torch.tensor([0.5, -1.0])
    expected = 0.5 * torch.exp(-s) * torch.tensor([10.0, 0.1]) + 0.5 * s
    assert float(out.loss.detach()) == pytest.approx(float(expected.sum()))
    assert float(out.weights["a"]) == pytest.approx(0.5 * math.exp(-0.5))
    assert float(out.weights["b"]) == pytest.approx(0.5 * math.exp(1.0))
    out.loss.backward()
    assert float(losses["a"].grad) == pytest.approx(0.5 * math.exp(-0.5))
    # d/ds = 0.5 (1 - exp(-s) L): the large loss pushes its s up, the small one pushes s down.
    before = balancer.log_vars.detach().clone()
    torch.testing.assert_close(balancer.log_vars.grad, 0.5 * (1 - torch.exp(-s) * torch.tensor([10.0, 0.1])))
    with torch.no_grad():
        balancer.log_vars.sub_(0.1 * balancer.log_vars.grad)
    assert balancer.log_vars[0] > before[0] and balancer.log_vars[1] < before[1]
    assert float(balancer(losses).weights["a"]) < 0.5 * math.exp(-0.5)
    assert [n for n, _ in balancer.named_parameters()] == ["log_vars"]


# --- DWA ------------------------------------------------------------------------------------------------


def _dwa_epoch(balancer: Balancer, steps: list[dict[str, float]]) -> list[dict[str, float]]:
    seen = []
    for values in steps:
        out = balancer({k: torch.tensor(v) for k, v in values.items()})
        seen.append({k: float(v) for k, v in out.weights.items()})
    balancer.on_train_epoch_end()
    return seen


def test_dwa_weights_from_epoch_averages():
    balancer = built("dwa", "a", "b", "c", temperature=2.0)
    epochs = [
        [{"a": 2.0, "b": 1.0}, {"a": 4.0, "b": 1.0}],  # c absent from epoch 0
        [{"a": 1.5, "b": 1.0, "c": 3.0}, {"a": 1.5, "b": 1.0, "c": 1.0}],
        [{"a": 1.0, "b": 0.5, "c": 1.0}, {"a": 0.5, "b": 1.5, "c": 1.0}],
    ]
    for weights in _dwa_epoch(balancer, epochs[0]) + _dwa_epoch(balancer, epochs[1]):
        assert weights == pytest.approx(dict.fromkeys(weights, 1.0))
    # Epoch 2: r = L(1) / L(0) = [1.5 / 3, 1 / 1, (c unseen in epoch 0) 1].
    expected = 3 * torch.softmax(torch.tensor([0.5, 1.0, 1.0]) / 2.0, 0)
    for weights in _dwa_epoch(balancer, epochs[2]):
        assert list(weights.values()) == pytest.approx(expected.tolist(), rel=1e-6)
    # Epoch 3: r = L(2) / L(1) = [0.75 / 1.5, 1 / 1, 1 / 2]; a subset uses the weights computed over all K.
    expected = 3 * torch.softmax(torch.tensor([0.5, 1.0, 0.5]) / 2.0, 0)
    weights = _dwa_epoch(balancer, [{"c": 1.0, "a": 2.0}])[0]
    assert weights == pytest.approx({"a": float(expected[0]), "c": float(expected[2])}, rel=1e-6)


def test_dwa_epoch_end_sums_over_ranks(monkeypatch):
    """Under DDP the epoch averages pool every rank's sums and counts (not an average of averages)."""
    import lightning_mtl.balancing.dwa as dwa

    balancer = built("dwa", "a", "b", temperature=1.0)
    other_rank = {0: torch.tensor([[9.0, 0.0], [3.0, 0.0]]), 1: torch.tensor([[10.0, 8.0], [5.0, 2.0]])}
    calls = iter(range(2))
    monkeypatch.setattr(dwa, "is_distributed", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: t.add_(other_rank[next(calls)]))
    _dwa_epoch(balancer, [{"a": 1.0, "b": 2.0}])  # global averages: a (1 + 9) / 4, b 2 / 1
    _dwa_epoch(balancer, [{"a": 2.0, "b": 4.0}])  # a (2 + 10) / 6, b (4 + 8) / 3
    torch.testing.assert_close(balancer.history, torch.tensor([[2.0, 4.0], [2.5, 2.0]]))
    weights = balancer({"a": torch.tensor(1.0), "b": torch.tensor(1.0)}).weights
    expected = 2 * torch.softmax(torch.tensor([2.0 / 2.5, 4.0 / 2.0]), 0)
    torch.testing.assert_close(torch.stack([weights["a"], weights["b"]]), expected)


# --- RLW ------------------------------------------------------------------------------------------------


def _rlw_weights(balancer: Balancer, names=("a", "b", "c")) -> torch.Tensor:
    """The weights of the balancer's current step (the call counts a step: it is set back after)."""
    step = balancer.step_count
    out = balancer({n: torch.tensor(1.0) for n in names})
    assert balancer.step_count == step + 1
    balancer.set_step_count(step)
    return torch.stack([out.weights[n] for n in names])


def test_rlw_weights_are_a_seeded_softmax():
    first = built("rlw", seed=3)
    weights = _rlw_weights(first)
    assert float(weights.sum()) == pytest.approx(1.0) and (weights > 0).all()
    assert torch.equal(weights, _rlw_weights(first))  # same (seed, calls): same draw
    same = built("rlw", seed=3)
    assert torch.equal(weights, _rlw_weights(same))
    assert not torch.allclose(weights, _rlw_weights(built("rlw", seed=4)))
    first.count_step()
    moved = _rlw_weights(first)
    assert not torch.allclose(weights, moved)
    # A subset uses its entries of the draw over all K tasks.
    subset = _rlw_weights(first, names=("a", "c"))
    torch.testing.assert_close(subset, moved[[0, 2]])
    # Resume: the counter is in the state dict, so a fresh instance continues the sequence.
    resumed = built("rlw", seed=3)
    resumed.load_state_dict(first.state_dict())
    assert int(resumed.calls) == 1 and torch.equal(_rlw_weights(resumed), moved)
    # The loss is the weighted sum; tasks absent from the step weigh 0.
    out = first({"a": torch.tensor(2.0), "b": torch.tensor(3.0), "c": torch.tensor(5.0)})
    assert float(out.loss.detach()) == pytest.approx(float(moved @ torch.tensor([2.0, 3.0, 5.0])))


def test_rlw_weights_vary_like_a_softmax_of_gaussians():
    balancer = built("rlw")
    draws = []
    for _ in range(200):
        draws.append(_rlw_weights(balancer))
        balancer.count_step()
    stacked = torch.stack(draws)
    assert stacked.mean(0).tolist() == pytest.approx([1 / 3] * 3, abs=0.05)
    assert float(stacked.std(0).min()) > 0.1


# --- GLS ------------------------------------------------------------------------------------------------


def test_gls_is_the_geometric_mean_with_matching_weights():
    balancer = built("gls")
    losses = {"a": torch.tensor(0.5, requires_grad=True), "b": torch.tensor(8.0, requires_grad=True)}
    losses["c"] = torch.tensor(2.0, requires_grad=True)
    out = balancer(losses)
    assert float(out.loss.detach()) == pytest.approx((0.5 * 8.0 * 2.0) ** (1 / 3))
    out.loss.backward()
    for name, loss in losses.items():
        assert float(loss.grad) == pytest.approx(float(out.weights[name]))
        assert float(out.weights[name]) == pytest.approx(
            float(out.loss.detach()) / (3 * float(loss.detach()))
        )


def test_gls_zero_loss_is_left_out():
    losses = {"a": torch.tensor(0.0, requires_grad=True), "b": torch.tensor(4.0, requires_grad=True)}
    losses["c"] = torch.tensor(9.0, requires_grad=True)
    out = built("gls")(losses)
    assert float(out.loss.detach()) == pytest.approx(6.0)  # sqrt(4 * 9) over the two positive losses
    out.loss.backward()
    assert float(out.weights["a"]) == 0.0 and float(losses["a"].grad) == 0.0
    assert float(losses["b"].grad) == pytest.approx(6.0 / (2 * 4.0))
    nothing = {"a": torch.tensor(0.0, requires_grad=True)}
    out = built("gls")(nothing)
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0 and float(nothing["a"].grad) == 0.0


def test_gls_is_stable_for_many_small_losses():
    losses = {f"t{i}": torch.tensor(1e-8) for i in range(40)}  # the plain product underflows to 0
    balancer = GeometricLossStrategy()
    balancer.setup(tasks(*losses))
    assert float(balancer(losses).loss) == pytest.approx(1e-8, rel=1e-4)


# --- FAMO -----------------------------------------------------------------------------------------------


def _famo_weights(balancer: Balancer, values: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in balancer({k: torch.tensor(v) for k, v in values.items()}).weights.items()}


def test_famo_forward_math():
    balancer = built("famo", "a", "b", min_losses={"b": 0.5})
    with torch.no_grad():
        balancer.logits.copy_(torch.tensor([0.3, -0.2]))
    losses = {"a": torch.tensor(2.0, requires_grad=True), "b": torch.tensor(1.5, requires_grad=True)}
    out = balancer(losses)
    z = torch.softmax(torch.tensor([0.3, -0.2]), 0)
    d = torch.tensor([2.0, 1.0]) + 1e-8
    c = (z / d).sum()
    assert float(out.loss.detach()) == pytest.approx(float((z * d.log()).sum() / c))
    out.loss.backward()
    for i, name in enumerate("ab"):
        assert float(losses[name].grad) == pytest.approx(float(z[i] / (c * d[i])))
        assert float(out.weights[name]) == pytest.approx(float(losses[name].grad))


def test_famo_raises_the_weight_of_the_task_that_did_not_improve():
    balancer = built("famo", "a", "b")
    start = _famo_weights(balancer, {"a": 1.0, "b": 1.0})
    assert start == pytest.approx({"a": 0.5, "b": 0.5})
    balancer.after_step(
        {"a": torch.tensor(1.0), "b": torch.tensor(1.0)}, {"a": torch.tensor(0.5), "b": torch.tensor(1.0)}
    )
    after = _famo_weights(balancer, {"a": 1.0, "b": 1.0})
    assert after["b"] > 0.5 > after["a"]
    assert balancer.logits[1] > balancer.logits[0]
    assert balancer.adam_step.tolist() == [1.0, 1.0]


def test_famo_logits_follow_adam_on_the_softmax_gradient():
    """Reference: torch.optim.Adam(weight_decay=gamma) on logits whose gradient is J_softmax^T delta."""
    balancer = built("famo", "a", "b", "c", w_lr=0.1, gamma=0.01)
    xi = torch.zeros(3, requires_grad=True)
    reference = torch.optim.Adam([xi], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        before = torch.rand(3, generator=gen) + 0.5
        after = before * (torch.rand(3, generator=gen) + 0.5)
        balancer.after_step(dict(zip("abc", before)), dict(zip("abc", after)))
        delta = (before + 1e-8).log() - (after + 1e-8).log()
        (xi.grad,) = torch.autograd.grad(torch.softmax(xi, 0), xi, grad_outputs=delta)
        reference.step()
    torch.testing.assert_close(balancer.logits, xi.detach())


def test_famo_update_only_touches_tasks_present_before_and_after():
    balancer = built("famo", "a", "b", "c")
    balancer.after_step(
        {"a": torch.tensor(1.0), "b": torch.tensor(1.0), "c": torch.tensor(1.0)},
        {"a": torch.tensor(0.5), "b": torch.tensor(1.0)},
    )
    assert balancer.adam_step.tolist() == [1.0, 1.0, 0.0]
    assert float(balancer.logits[2]) == 0.0 and float(balancer.exp_avg[2]) == 0.0
    assert balancer.logits[1] > balancer.logits[0]


# --- GradNorm -------------------------------------------------------------------------------------------


def test_gradnorm_raises_the_weight_of_the_task_with_the_smaller_gradient():
    balancer = built("gradnorm", "a", "b", alpha=1.5)
    optimizer = torch.optim.SGD(balancer.parameters(), lr=0.1)
    losses, context, _ = step_inputs({"a": 10.0, "b": 1.0})
    out = balancer(losses, context)
    assert {k: float(v) for k, v in out.weights.items()} == {"a": 1.0, "b": 1.0}
    assert float(out.loss.detach()) > float(
        (losses["a"] + losses["b"]).detach()
    )  # includes |w G - target| > 0
    out.loss.backward()
    optimizer.step()
    assert balancer.weights[1] > 1.0 > balancer.weights[0]
    torch.testing.assert_close(balancer.initial_losses, torch.stack([losses["a"], losses["b"]]).detach())
    with torch.no_grad():
        balancer.weights.mul_(torch.tensor([3.0, 0.5]))  # an unnormalised state, as after many steps
    out = balancer(*step_inputs({"a": 10.0, "b": 1.0})[:2])
    assert float(balancer.weights.detach().sum()) == pytest.approx(2.0)
    assert float(out.weights["a"] + out.weights["b"]) == pytest.approx(2.0)
    with torch.no_grad():
        balancer.weights.copy_(torch.tensor([-1.0, 0.0]))
    balancer(*step_inputs({"a": 10.0, "b": 1.0})[:2])
    assert (balancer.weights > 0).all() and float(balancer.weights.detach().sum()) == pytest.approx(2.0)


@pytest.mark.parametrize("layer", [None, "1."])
def test_gradnorm_term_matches_a_hand_computation(layer):
    balancer = built("gradnorm", "a", "b", alpha=2.0, layer=layer)
    balancer(*step_inputs({"a": 1.0, "b": 1.0})[:2])  # records L(0) = these losses
    with torch.no_grad():
        balancer.weights.copy_(torch.tensor([1.5, 0.5]))
    losses, context, backbone = step_inputs({"a": 1.0, "b": 3.0})
    inputs = context.features if layer is None else list(backbone[1].parameters())
    norms = torch.stack(
        [
            torch.cat([g.flatten() for g in torch.autograd.grad(losses[n], inputs, retain_graph=True)]).norm()
            for n in "ab"
        ]
    )
    first, _, _ = step_inputs({"a": 1.0, "b": 1.0})
    ratio = torch.stack([losses[n] / first[n] for n in "ab"]).detach()
    target = (torch.tensor([1.5, 0.5]) * norms).mean() * (ratio / ratio.mean()) ** 2.0
    grad_term = (torch.tensor([1.5, 0.5]) * norms - target).abs().sum()
    out = balancer(losses, context)
    expected = 1.5 * losses["a"] + 0.5 * losses["b"] + grad_term
    assert float(out.loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


def test_gradnorm_is_invariant_to_the_loss_scale():
    results = []
    for scale in (1.0, 1024.0):
        balancer = built("gradnorm", "a", "b")
        losses, context, _ = step_inputs({"a": 5.0, "b": 1.0}, loss_scale=scale)
        out = balancer(losses, context)
        out.loss.backward()
        results.append((out.loss.detach(), balancer.weights.grad.clone()))
    torch.testing.assert_close(results[0], results[1])


def test_gradnorm_errors():
    balancer = built("gradnorm", "a", "b", layer="head.")
    losses, context, _ = step_inputs({"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError, match=r"layer='head.'.*no trainable backbone parameter.*'0.weight'"):
        balancer(losses, context)
    with pytest.raises(ValueError, match="GradNorm needs a StepContext"):
        built("gradnorm")(losses)
    frozen = StepContext(
        features=[f.detach() for f in context.features], backbone=context.backbone, loss_scale=torch.ones(())
    )
    with pytest.raises(ValueError, match="none requires grad"):
        built("gradnorm", "a", "b")(losses, frozen)
