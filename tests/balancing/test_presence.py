"""Every gradient method on all T tasks with a presence mask on the device: absent tasks get weight 0 and
the rest is the method on the present tasks alone; no host synchronisation; an operation budget per call;
absent tasks' state untouched.

Parametrised over the registry (every balancer of the ``gradient`` family), so a new method is checked
here without new test code. Operation counts come from ``benchmarks/solver_ops.py`` (the same counter).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import load_script

from lightning_mtl import Task
from lightning_mtl.balancing import create_balancer
from lightning_mtl.balancing.base import StepContext
from lightning_mtl.balancing.gradient import GradientBalancer

OPS = load_script(Path(__file__).resolve().parents[2] / "benchmarks" / "solver_ops.py")
METHODS = OPS.gradient_methods()
#: Methods whose random draws depend on T (each task's order of visits): the present tasks visit each
#: other in a uniformly random order, but not the one the method on them alone draws.
ORDERS_DEPEND_ON_T = {"pcgrad", "gradvac"}
#: Top-level aten operations of one call at T = 8 (measured, then ~10% of slack): a regression fails here.
#: A method not listed gets DEFAULT_BUDGET.
BUDGETS = {
    "aligned_mtl": 48,
    "cagrad": 90,
    "db_mtl": 42,
    "graddrop": 65,
    "gradvac": 165,
    "imtl": 50,
    "mgda": 88,
    "mgda_ub": 88,
    "nash_mtl": 385,
    "pcgrad": 68,
    "upgrad": 62,
}
DEFAULT_BUDGET = 150
#: Methods whose one ``torch.linalg.eigh`` checks its result on the host (there is no ``eigh_ex``).
ONE_SYNC = {"aligned_mtl"}
F64 = torch.float64


def build(name: str, names: list[str]) -> GradientBalancer:
    balancer = create_balancer(name)
    assert isinstance(balancer, GradientBalancer)
    balancer.setup([Task(n, kind="regression") for n in names])
    return balancer


def task_names(n: int) -> list[str]:
    return [f"t{i}" for i in range(n)]


def jacobian(n: int, seed: int, p: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, p, generator=g, dtype=F64) + 0.3 * torch.randn(1, p, generator=g, dtype=F64)


def random_mask(n: int, seed: int, present: int | None = None) -> torch.Tensor:
    """At least one task absent and one present (exactly ``present`` present if given)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    k = present if present is not None else int(torch.randint(1, n, (1,), generator=g))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=g)[:k]] = True
    return mask


def assert_subset(name: str, jac: torch.Tensor, present: torch.Tensor) -> None:
    """``aggregate`` on all tasks (zero rows for the absent) equals the method built for the present ones."""
    names = task_names(jac.shape[0])
    d, w = build(name, names).aggregate(jac * present[:, None], present)
    assert torch.isfinite(d).all() and torch.isfinite(w).all()
    assert (w[~present] == 0).all()
    kept = [n for n, p in zip(names, present.tolist()) if p]
    d_sub, w_sub = build(name, kept).aggregate(jac[present])
    scale = float(jac.norm(dim=1).max())
    torch.testing.assert_close(d, d_sub, rtol=1e-8, atol=1e-10 * scale)
    torch.testing.assert_close(w[present], w_sub, rtol=1e-8, atol=1e-10 * float(w_sub.abs().max()))


# --- absent tasks: weight 0, the rest is the method on the present tasks ---------------------------------
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n", [3, 5, 8])
@pytest.mark.parametrize("name", METHODS)
def test_absent_tasks_get_zero_weight_and_the_others_the_subset_method(name, n, seed):
    jac, present = jacobian(n, seed), random_mask(n, seed)
    if name in ORDERS_DEPEND_ON_T:  # the draws differ: absent weights exactly 0, finite, a real direction
        d, w = build(name, task_names(n)).aggregate(jac * present[:, None], present)
        assert (w[~present] == 0).all() and torch.isfinite(d).all()
        assert (w[present] > 0).all() and float(d.norm()) > 0
        return
    assert_subset(name, jac, present)


@pytest.mark.parametrize("n", [3, 8])
@pytest.mark.parametrize("name", METHODS)
def test_two_present_tasks_are_the_two_task_method(name, n):
    """With two tasks present each visits the other only (the absent ones add nothing): every method,
    including those with random orders, equals the two-task method."""
    jac = jacobian(n, 7)
    jac[1] = -0.5 * jac[0] + jac[1]  # in conflict, so that the projections do something
    assert_subset(name, jac, torch.arange(n) < 2)


@pytest.mark.parametrize("name", METHODS)
def test_absent_rows_content_is_irrelevant(name):
    """Whatever an absent task's row holds, the result is that of a zero row."""
    n = 5
    jac, present = jacobian(n, 3), random_mask(n, 3, present=3)
    zero = jac * present[:, None]
    noise = zero + 5.0 * torch.randn(n, jac.shape[1], dtype=F64) * ~present[:, None]
    d0, w0 = build(name, task_names(n)).aggregate(zero, present)
    d1, w1 = build(name, task_names(n)).aggregate(noise, present)
    assert torch.equal(d0, d1) and torch.equal(w0, w1)


@pytest.mark.parametrize("name", METHODS)
def test_random_methods_agree_with_the_subset_when_no_gradient_conflicts(name):
    """All-agreeing gradients (every cosine > 0): no projection, whatever the order."""
    n = 6
    jac = torch.rand(n, 30, generator=torch.Generator().manual_seed(0), dtype=F64) + 0.1
    present = random_mask(n, 4, present=4)
    assert_subset(name, jac, present)


@pytest.mark.parametrize("name", METHODS)
def test_no_task_present_gives_a_zero_direction(name):
    n = 4
    d, w = build(name, task_names(n)).aggregate(
        torch.zeros(n, 20, dtype=F64), torch.zeros(n, dtype=torch.bool)
    )
    assert torch.isfinite(d).all() and torch.isfinite(w).all()
    assert torch.equal(d, torch.zeros_like(d)) and torch.equal(w, torch.zeros_like(w))


# --- no host synchronisation, few operations -------------------------------------------------------------
@pytest.mark.parametrize("absent", [0, 1])
@pytest.mark.parametrize("n", [2, 8, 12])
@pytest.mark.parametrize("name", METHODS)
def test_no_host_synchronisation(name, n, absent):
    """No ``.item()`` (``aten::_local_scalar_dense``) and no boolean indexing (``aten::nonzero``): 12 tasks
    take the interior-point / path-following code beyond the 10 tasks that are enumerated."""
    fn = OPS.one_call(name, n, absent)
    fn()
    syncs = OPS.count_ops(fn)["syncs"]
    assert syncs <= (1 if name in ONE_SYNC else 0), f"{name}: {syncs} host synchronisations"


@pytest.mark.parametrize("name", METHODS)
def test_operation_budget(name):
    fn = OPS.one_call(name, 8)
    fn()
    ops = OPS.count_ops(fn)["ops"]
    budget = BUDGETS.get(name, DEFAULT_BUDGET)
    assert ops <= budget, f"{name}: {ops} aten operations at T = 8, over its budget of {budget}"


@pytest.mark.parametrize("name", METHODS)
def test_jacobian_step_does_not_synchronise(name):
    """The whole step (presence mask, Jacobian rows, the method, the update_every cache and its reuse)
    reads nothing back to the host. Task ``c`` has no label in the batch."""
    torch.manual_seed(0)
    names = ["a", "b", "c"]
    linear = create_balancer(name).linear
    balancer = create_balancer({"name": name, "update_every": 2 if linear else 1})
    assert isinstance(balancer, GradientBalancer)
    balancer.setup([Task(n, kind="regression") for n in names])
    backbone = torch.nn.Linear(4, 6)
    heads = {n: torch.nn.Linear(6, 1) for n in names}
    x = torch.randn(8, 4)
    for step in range(3 if linear else 1):  # computed, reused, computed
        features = backbone(x)
        losses = {n: heads[n](features).square().mean() for n in ("a", "b")}
        params = {n: list(heads[n].parameters()) for n in names}
        context = StepContext(
            features=[features], backbone=backbone, loss_scale=torch.tensor(1.0), task_parameters=params
        )
        counted = OPS.count_ops(lambda: balancer(losses, context))  # noqa: B023  (counts the step itself)
        assert counted["syncs"] <= (1 if name in ONE_SYNC and step != 1 else 0), (name, step)


# --- state of absent tasks --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_absent_tasks_keep_their_state(name):
    """Every per-task buffer (first dimension T; T x T: also the columns) keeps the rows of the tasks absent
    from a step; the stateful methods' present rows do move."""
    n, p = 4, 30
    balancer = build(name, task_names(n))
    balancer.aggregate(jacobian(n, 0, p))
    before = {k: v.clone() for k, v in balancer.state_dict().items()}
    present = torch.tensor([True, False, True, False])
    balancer.set_step_count(1)
    balancer.aggregate(jacobian(n, 1, p) * present[:, None], present)
    changed = set()
    for key, old in before.items():
        new = balancer.state_dict()[key]
        if key in ("calls", "cached_weights", "cached_mask") or old.dim() == 0 or old.shape[0] != n:
            continue
        assert torch.equal(new[~present], old[~present]), f"{name}: {key} rows of absent tasks changed"
        if old.dim() == 2 and old.shape[1] == n:
            assert torch.equal(new[:, ~present], old[:, ~present]), f"{name}: {key} columns changed"
        if not torch.equal(new[present], old[present]):
            changed.add(key)
    expected = {"gradvac": {"targets"}, "nash_mtl": {"alpha"}, "db_mtl": {"grad_ema", "steps"}}.get(
        name, set()
    )
    assert changed == expected
