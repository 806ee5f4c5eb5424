"""Gradient aggregators MGDA, PCGrad, GradVac, IMTL-G, GradDrop, DB-MTL: against TorchJD, against the
defining maths on hand-made vectors, robustness (zero/duplicated rows, one task, float32) and state."""

from __future__ import annotations

import pytest
import torch
from torchjd.aggregation import IMTLG as TorchJDIMTLG
from torchjd.aggregation import MGDA as TorchJDMGDA
from torchjd.aggregation import GradDrop as TorchJDGradDrop
from torchjd.aggregation import GradVac as TorchJDGradVac
from torchjd.aggregation import PCGrad as TorchJDPCGrad

from lightning_mtl import Task
from lightning_mtl.balancing import create_balancer
from lightning_mtl.balancing._solvers import random_orders
from lightning_mtl.balancing.db_mtl import DBMTL
from lightning_mtl.balancing.graddrop import GradDrop
from lightning_mtl.balancing.gradient import GradientBalancer
from lightning_mtl.balancing.gradvac import GradVac
from lightning_mtl.balancing.imtl import IMTLG
from lightning_mtl.balancing.mgda import MGDA, MGDAUB
from lightning_mtl.balancing.pcgrad import PCGrad

NAMES = ["mgda", "mgda_ub", "pcgrad", "gradvac", "imtl", "graddrop", "db_mtl"]
F64 = torch.float64


def names(n: int) -> list[str]:
    return [f"t{i}" for i in range(n)]


def build(kind: str | type[GradientBalancer], n: int, **kwargs) -> GradientBalancer:
    balancer = create_balancer({"name": kind, **kwargs}) if isinstance(kind, str) else kind(**kwargs)
    assert isinstance(balancer, GradientBalancer)
    balancer.setup([Task(name, kind="regression") for name in names(n)])
    return balancer


def jacobian(n: int, seed: int, p: int = 50, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(n, p, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def torch_seed(balancer: GradientBalancer) -> int:
    """The seed of ``balancer.generator()``: seeding TorchJD's global RNG with it gives it the same draws."""
    return balancer.seed * 1_000_003 + int(balancer.calls)


def feed_orders(monkeypatch: pytest.MonkeyPatch, balancer: GradientBalancer, n: int, drop_self: bool) -> list:
    """Make ``torch.randperm``, which TorchJD calls once per task ``i`` (in order), return the order in which
    ``balancer`` makes task ``i`` visit the others at its current step: PCGrad's ``randperm(T)`` (the task
    itself put last, where it is skipped), GradVac's ``randperm(T - 1)`` (positions among the others).
    Returns the rows still to be drawn (empty once TorchJD has drawn them all)."""
    order = random_orders(balancer.generator(torch.device("cpu")), n, torch.device("cpu"))
    rows = []
    for i, row in enumerate(order):
        rows.append(row - (row > i).long() if drop_self else torch.cat([row, torch.tensor([i])]))
    pending = list(rows)

    def randperm(size: int, *args, **kwargs) -> torch.Tensor:
        row = pending.pop(0)
        assert row.shape == (size,) and sorted(row.tolist()) == list(range(size))
        return row

    monkeypatch.setattr(torch, "randperm", randperm)
    return pending


# --- the same directions as TorchJD ---------------------------------------------------------------------
CASES = [(n, seed) for n in (2, 3, 5, 8) for seed in range(3)]


@pytest.mark.parametrize(("n", "seed"), CASES)
def test_mgda_matches_torchjd(n, seed):
    jac = jacobian(n, seed)
    d, _ = build(MGDA, n).aggregate(jac)
    theirs = TorchJDMGDA().gramian_weighting(jac @ jac.T)
    expected = theirs @ jac
    if n == 2:  # their Frank-Wolfe line search is exact on a segment: one step reaches the optimum
        torch.testing.assert_close(d, expected, rtol=1e-12, atol=1e-12)
    else:
        # Their Frank-Wolfe stops after 100 steps or a step < 1e-3, not at the optimum. Its duality gap
        # bounds its own error: |d_theirs - d*|^2 <= gap; ours is d* (see the optimality test below).
        dots = jac @ expected
        gap = expected @ expected - dots.min()
        assert (d - expected).norm() <= gap.clamp_min(0).sqrt() + 1e-12
        assert gap.sqrt() < 0.2 * d.norm()  # the bound is tight enough to mean something


@pytest.mark.parametrize(("n", "seed"), CASES)
def test_pcgrad_matches_torchjd_with_the_same_orders(n, seed, monkeypatch):
    balancer = build(PCGrad, n, seed=seed)
    balancer.set_step_count(5 + seed)
    jac = jacobian(n, seed)
    d, _ = balancer.aggregate(jac)
    pending = feed_orders(monkeypatch, balancer, n, drop_self=False)  # TorchJD: a torch.randperm(T) per task
    torch.testing.assert_close(d, TorchJDPCGrad()(jac), rtol=1e-12, atol=1e-12)
    assert not pending


@pytest.mark.parametrize(("n", "seed"), CASES)
def test_gradvac_matches_torchjd_over_steps(n, seed, monkeypatch):
    ours, theirs = build(GradVac, n, seed=seed), TorchJDGradVac(beta=0.5)
    base = jacobian(n, seed)
    for step in range(4):  # the EMA targets carry over: steps 1-3 test the state too
        jac = base + jacobian(n, 100 + step)
        ours.set_step_count(step)
        d, _ = ours.aggregate(jac)
        pending = feed_orders(monkeypatch, ours, n, drop_self=True)  # TorchJD: torch.randperm(T - 1) per task
        expected = theirs(jac)
        assert not pending
        # TorchJD adds an absolute eps=1e-8 to denominators of size |g|^2 ~ 100 (we use relative floors)
        # and we keep the targets in a float32 buffer: ~1e-9 relative differences, growing with the steps.
        torch.testing.assert_close(d, expected, rtol=0.0, atol=1e-7 * float(expected.norm()))


@pytest.mark.parametrize(("n", "seed"), CASES)
def test_imtl_matches_torchjd(n, seed):
    jac = jacobian(n, seed)
    d, w = build(IMTLG, n).aggregate(jac)
    # our pseudo-inverse is Tikhonov-regularised, (C^2 + 1e-12 I)^-1 C, on a cosine matrix whose
    # smallest eigenvalue is ~0.1 for these random gradients: ~1e-10 relative.
    torch.testing.assert_close(d, TorchJDIMTLG()(jac), rtol=1e-9, atol=1e-12)
    assert float(w.sum()) == pytest.approx(1.0)


@pytest.mark.parametrize(("n", "seed"), CASES)
def test_graddrop_matches_torchjd_with_the_same_draws(n, seed):
    balancer = build(GradDrop, n, seed=seed, mode="params")
    balancer.set_step_count(11)
    jac = jacobian(n, seed)
    d, _ = balancer.aggregate(jac)
    torch.manual_seed(torch_seed(balancer))  # one torch.rand(P) on both sides
    torch.testing.assert_close(d, TorchJDGradDrop()(jac), rtol=1e-12, atol=1e-12)


# --- the defining maths on hand-made vectors ----------------------------------------------------------
def test_pcgrad_projects_two_conflicting_vectors():
    jac = torch.tensor([[2.0, 0.0], [-1.0, 1.0]], dtype=F64)  # g1 . g2 = -2 < 0
    d, w = build(PCGrad, 2).aggregate(jac)
    # g1' = g1 - (-2 / |g2|^2) g2 = (1, 1); g2' = g2 - (-2 / |g1|^2) g1 = (0, 1)
    torch.testing.assert_close(d, torch.tensor([1.0, 2.0], dtype=F64))
    torch.testing.assert_close(w, torch.tensor([1.5, 2.0], dtype=F64))
    agreeing = torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=F64)
    torch.testing.assert_close(build(PCGrad, 2).aggregate(agreeing)[0], agreeing.sum(0))


def test_mgda_two_tasks_is_the_closed_form():
    jac = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=F64)
    d, w = build(MGDA, 2).aggregate(jac)
    # w1 = (|g2|^2 - g1.g2) / |g1 - g2|^2 = 4 / 5
    torch.testing.assert_close(w, torch.tensor([0.8, 0.2], dtype=F64))
    torch.testing.assert_close(d, torch.tensor([0.8, 0.4], dtype=F64))
    one_sided = torch.tensor([[1.0, 0.0], [3.0, 1.0]], dtype=F64)  # g1 . g2 >= |g1|^2: g1 itself
    torch.testing.assert_close(build(MGDA, 2).aggregate(one_sided)[0], one_sided[0])
    # three tasks, the third dominated (it is far from 0): the midpoint of g1, g2, and exactly w3 = 0
    three = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 1.0]], dtype=F64)
    d, w = build(MGDA, 3).aggregate(three)
    torch.testing.assert_close(w[:2], torch.tensor([0.5, 0.5], dtype=F64), rtol=0, atol=1e-15)
    assert w[2] == 0  # the solve on the identified support gives exact zeros, not interior-point 1e-19s


@pytest.mark.parametrize("n", [3, 5, 8, 16, 32])
def test_mgda_is_the_min_norm_point(n):
    """KKT: d . g_t >= |d|^2 for every t, with equality where w_t > 0. The duality gap
    ``|d|^2 - min_t d . g_t`` bounds ``|d - d*|^2``: below (1e-6 |d|)^2 the result is the exact min-norm
    point to 1e-6 relative (the accuracy the default max_iters is chosen for)."""
    for seed in range(4):
        jac = jacobian(n, seed) + 0.3 * jacobian(1, 1000 + seed)  # correlated tasks: a face of the hull
        d, w = build(MGDA, n).aggregate(jac)
        dots, sq = jac @ d, d @ d
        assert (w >= 0).all() and float(w.sum()) == pytest.approx(1.0)
        assert float(sq - dots.min()) <= (1e-6) ** 2 * float(sq)
        support = w > 1e-9
        torch.testing.assert_close(dots[support], sq.expand(int(support.sum())), rtol=1e-9, atol=0.0)


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_imtl_projections_on_unit_gradients_are_equal(n):
    jac = jacobian(n, n) * torch.logspace(-2, 2, n, dtype=F64)[:, None]  # very different norms
    d, w = build(IMTLG, n).aggregate(jac)
    projections = (jac / jac.norm(dim=1, keepdim=True)) @ d
    torch.testing.assert_close(projections, projections[0].expand(n), rtol=1e-9, atol=0.0)
    assert float(projections[0]) > 0 and float(w.sum()) == pytest.approx(1.0)


def test_imtl_keeps_a_descent_direction_when_the_weights_sum_negative():
    jac = torch.tensor([[1.0, 0.0, 0.0], [-2.0, -2.0, -1.0], [3.0, 1.0, 0.0]], dtype=F64)
    d, w = build(IMTLG, 3).aggregate(jac)
    projections = (jac / jac.norm(dim=1, keepdim=True)) @ d
    torch.testing.assert_close(projections, projections[0].expand(3), rtol=1e-7, atol=0.0)
    assert float(projections[0]) > 0.2  # the paper's sum(w) = 1 gives -0.215 for all three (TorchJD too)
    assert float(w.sum()) == pytest.approx(-1.0)
    torch.testing.assert_close(TorchJDIMTLG()(jac), -d)


def test_graddrop_keeps_everything_when_signs_agree():
    jac = jacobian(4, 0).abs() * torch.tensor([1.0, -1.0] * 25, dtype=F64)  # per column: one sign
    d, _ = build(GradDrop, 4).aggregate(jac)
    torch.testing.assert_close(d, jac.sum(0))


def test_graddrop_draws_depend_on_the_step_only():
    row = jacobian(1, 0, p=200).abs()
    jac = torch.cat([row, -row])  # P = 0.5 everywhere: each column keeps +row or -row
    balancer = build(GradDrop, 2)
    first, _ = balancer.aggregate(jac)
    assert torch.equal(first.abs(), row[0])
    assert 50 < int((first > 0).sum()) < 150
    again, _ = build(GradDrop, 2).aggregate(jac)  # another instance, same calls: same draws
    assert torch.equal(first, again)
    balancer.count_step()
    assert not torch.equal(balancer.aggregate(jac)[0], first)
    assert not torch.equal(build(GradDrop, 2, seed=1).aggregate(jac)[0], first)


def test_db_mtl_ema_and_equal_norms():
    balancer = build(DBMTL, 2)
    # task 0 lives on coordinates 0-1 and task 1 on coordinate 2: d splits into the two tasks' parts
    g1 = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 0.4]], dtype=F64)
    g2 = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, -0.2]], dtype=F64)
    balancer.aggregate(g1)
    d, _ = balancer.aggregate(g2)
    # m <- g + 0.9 / k**0.5 * (m - g): k = 1 from m = 0 gives 0.1 g1; k = 2 gives g2 + 0.9/sqrt(2) (0.1 g1 - g2)
    rate = 0.9 / 2**0.5
    expected = g2 + rate * (0.1 * g1 - g2)
    torch.testing.assert_close(balancer.grad_ema, expected)
    assert balancer.steps.tolist() == [2, 2]
    # d = sum_t (max_k |m_k| / |m_t|) m_t: each task's part of d has the largest EMA norm
    norms = expected.norm(dim=1)
    torch.testing.assert_close(d, (norms.max() / norms) @ expected)
    torch.testing.assert_close(torch.stack([d[:2].norm(), d[2:].norm()]), norms.max().expand(2))
    assert float(norms[0] / norms[1]) > 5  # ... although the EMAs themselves differ a lot


def test_db_mtl_takes_log_losses_and_needs_parameter_gradients():
    losses = build(DBMTL, 1).prepare_losses({"t0": torch.tensor(2.0), "t1": torch.tensor(-1.0)})
    assert float(losses["t0"]) == pytest.approx(torch.log(torch.tensor(2.0 + 1e-8)).item())
    assert float(losses["t1"]) == pytest.approx(torch.log(torch.tensor(1e-8)).item())
    with pytest.raises(ValueError, match="needs parameter gradients"):
        DBMTL(mode="features")


def test_default_modes():
    assert MGDA().mode == "params" and MGDAUB().mode == "features" and GradDrop().mode == "features"
    with pytest.raises(ValueError, match="update_every must be 1"):
        GradDrop(update_every=2)


# --- robustness -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_zero_rows_change_nothing(name):
    """A zero gradient adds nothing to any of these methods (MGDA: it *is* the min-norm point, d = 0).
    Two other tasks, in conflict: with two, the random orders of PCGrad/GradVac do not matter."""
    jac = jacobian(2, 7)
    jac[1] = -0.5 * jac[0] + jac[1]
    with_zero = torch.stack([jac[0], torch.zeros(50, dtype=F64), jac[1]])
    d, w = build(name, 3).aggregate(with_zero)
    assert torch.isfinite(d).all() and torch.isfinite(w).all()
    if name.startswith("mgda"):
        assert torch.equal(d, torch.zeros_like(d))
        return
    expected, _ = build(name, 2).aggregate(jac)
    torch.testing.assert_close(d, expected, rtol=1e-9, atol=1e-12)
    everything_zero, _ = build(name, 3).aggregate(torch.zeros(3, 50, dtype=F64))
    assert torch.equal(everything_zero, torch.zeros(50, dtype=F64))


@pytest.mark.parametrize("name", NAMES)
def test_duplicated_rows(name):
    jac = jacobian(3, 3)
    dup = torch.cat([jac, jac[:1]])
    d, w = build(name, 4).aggregate(dup)
    assert torch.isfinite(d).all() and torch.isfinite(w).all()
    if name.startswith("mgda") or name == "imtl":  # the same hull / the same equal-projection direction
        torch.testing.assert_close(d, build(name, 3).aggregate(jac)[0], rtol=1e-8, atol=1e-10)
    twins, _ = build(name, 2).aggregate(torch.stack([jac[0], jac[0]]))
    if name.startswith("mgda") or name == "imtl":
        torch.testing.assert_close(twins, jac[0])
    else:  # no conflict between identical gradients: the plain sum (DB-MTL: of the EMAs, 0.1 g)
        torch.testing.assert_close(twins, (0.2 if name == "db_mtl" else 2.0) * jac[0])


@pytest.mark.parametrize("name", NAMES)
def test_one_task(name):
    g = jacobian(1, 4)
    d, w = build(name, 1).aggregate(g)
    scale = 0.1 if name == "db_mtl" else 1.0  # DB-MTL's EMA starts at 0: m = 0.1 g after one step
    torch.testing.assert_close(d, scale * g[0])
    assert w.shape == (1,)


@pytest.mark.parametrize("name", NAMES)
def test_float32(name):
    jac = jacobian(4, 9) + 0.5 * jacobian(1, 10)
    d32, w32 = build(name, 4).aggregate(jac.float())
    d64, _ = build(name, 4).aggregate(jac)
    assert d32.dtype == torch.float32 and w32.dtype == torch.float32
    assert torch.isfinite(d32).all() and torch.isfinite(w32).all()
    if name != "graddrop":  # GradDrop draws U in the Jacobian's dtype: other numbers in float32
        torch.testing.assert_close(d32.double(), d64, rtol=1e-4, atol=1e-5)


# --- state ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [GradVac, DBMTL])
def test_state_dict_round_trip_continues_identically(cls):
    first = build(cls, 3)
    for step in range(2):
        first.set_step_count(step)
        first.aggregate(jacobian(3, step))
    first.set_step_count(2)
    second = build(cls, 3)  # fresh: DB-MTL's buffer is still 3 x 0
    second.load_state_dict(first.state_dict())
    jac = jacobian(3, 99)
    assert int(second.calls) == 2
    d1, w1 = first.aggregate(jac)
    d2, w2 = second.aggregate(jac)
    assert torch.equal(d1, d2) and torch.equal(w1, w2)
    fresh, _ = build(cls, 3).aggregate(jac)
    assert not torch.allclose(d1, fresh)  # the state mattered


def test_absent_tasks_keep_their_state():
    gradvac, db = build(GradVac, 3), build(DBMTL, 3)
    for balancer in (gradvac, db):
        balancer.aggregate(jacobian(3, 0))
    targets, ema, steps = gradvac.targets.clone(), db.grad_ema.clone(), db.steps.clone()
    rows = jacobian(2, 1)
    jac = torch.stack([rows[0], torch.zeros_like(rows[0]), rows[1]])  # t1 absent: a zero row
    for balancer in (gradvac, db):
        balancer.aggregate(jac, torch.tensor([True, False, True]))
    assert torch.equal(gradvac.targets[1], targets[1]) and torch.equal(gradvac.targets[:, 1], targets[:, 1])
    assert not torch.equal(gradvac.targets[0, 2], targets[0, 2])
    assert torch.equal(db.grad_ema[1], ema[1]) and db.steps.tolist() == [2, 1, 2]
    assert not torch.equal(db.grad_ema[0], ema[0]) and steps.tolist() == [1, 1, 1]


def test_setup_with_new_tasks_keeps_the_state_of_the_others():
    gradvac, db = build(GradVac, 3), build(DBMTL, 3)
    for balancer in (gradvac, db):
        balancer.aggregate(jacobian(3, 0))
    targets, ema = gradvac.targets.clone(), db.grad_ema.clone()
    new_tasks = [Task(n, kind="regression") for n in ["t2", "new", "t0"]]
    for balancer in (gradvac, db):
        balancer.setup(new_tasks)
    torch.testing.assert_close(gradvac.targets[[0, 2]][:, [0, 2]], targets[[2, 0]][:, [2, 0]])
    assert gradvac.targets[1].abs().sum() == 0 and gradvac.targets[:, 1].abs().sum() == 0
    torch.testing.assert_close(db.grad_ema, torch.stack([ema[2], torch.zeros_like(ema[0]), ema[0]]))
    assert db.steps.tolist() == [1, 0, 1]


@pytest.mark.parametrize("name", NAMES)
def test_spec_round_trip(name):
    balancer = create_balancer(name)
    rebuilt = create_balancer(balancer.spec())
    assert type(rebuilt) is type(balancer) and rebuilt.config() == balancer.config()


def test_graddrop_leak():
    jac = torch.cat([jacobian(1, 0), -jacobian(1, 0)])  # P = 0.5 everywhere: half of each row is dropped
    dropped, _ = build(GradDrop, 2).aggregate(jac)
    everything, _ = build(GradDrop, 2, leak=1.0).aggregate(jac)
    torch.testing.assert_close(everything, jac.sum(0))
    only_t1, _ = build(GradDrop, 2, leak={"t1": 1.0}).aggregate(jac)  # same draws: t0 filtered
    torch.testing.assert_close(only_t1, torch.where(dropped == jac[0], jac[0], 0.0) + jac[1])
    with pytest.raises(ValueError, match=r"leak must be in \[0, 1\]"):
        GradDrop(leak={"t0": 2.0})


@pytest.mark.parametrize("leak", [0.0, 0.3, {"t0": 0.25, "t2": 0.8}])
def test_graddrop_matches_the_papers_masks(leak):
    """Against the paper's formula written out with explicit masks M_t (the same uniform draws)."""
    torch.manual_seed(5)
    jac = torch.randn(3, 40)
    jac[:, :5] = jac[:, :5].abs()  # some coordinates where every sign agrees
    balancer = build(GradDrop, 3, leak=leak)
    draw = torch.rand(40, generator=balancer.generator(jac.device))  # the draws aggregate() makes
    purity = 0.5 * (1 + jac.sum(0) / jac.abs().sum(0))
    masks = (((purity > draw) & (jac > 0)) | ((purity < draw) & (jac < 0))).float()
    per_task = torch.tensor([leak.get(n, 0.0) if isinstance(leak, dict) else leak for n in names(3)])
    want = ((per_task[:, None] + (1 - per_task[:, None]) * masks) * jac).sum(0)
    got, weights = balancer.aggregate(jac)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(weights, jac @ want / (jac * jac).sum(1))
