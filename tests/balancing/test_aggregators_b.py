"""CAGrad, Nash-MTL, Aligned-MTL and UPGrad: same direction as TorchJD, optimality conditions, robustness.

The solvers run in torch; TorchJD (test-only) solves the same problems with cvxpy/quadprog. Tolerances
follow the reference's accuracy: Aligned-MTL is a closed form on both sides (1e-10), UPGrad's QPs are
solved exactly on both sides (1e-8), Nash-MTL's reference stops its cvxpy/ECOS sequence at ~1e-8 (1e-6),
and CAGrad's reference (cvxpy/CLARABEL at default tolerances) is only accurate to ~1e-4 in the weights:
there we check 1e-3 against it, that our objective is never worse than TorchJD's, and the exact optimality
conditions to 1e-9.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_mtl import Task, list_balancers
from lightning_mtl.balancing import AlignedMTL, CAGrad, NashMTL, UPGrad, create_balancer
from lightning_mtl.balancing._solvers import ENUMERATE_MAX, nonneg_qp, normalized_gram
from lightning_mtl.balancing.gradient import GradientBalancer

torchjd = pytest.importorskip(
    "torchjd.aggregation", reason="TorchJD is the reference (pip install -e .[dev])"
)

D = torch.float64
METHODS = {"cagrad": CAGrad, "nash_mtl": NashMTL, "aligned_mtl": AlignedMTL, "upgrad": UPGrad}
CASES = [(n, kind, seed) for n in (2, 3, 5, 8) for kind, seed in (("iid", 0), ("iid", 1), ("deficient", 2))]


def jacobian(n: int, kind: str = "iid", seed: int = 0, p: int = 50) -> torch.Tensor:
    """``n x p`` float64: ``iid`` normal rows; ``deficient``: rank 2 (rank-deficient for ``n > 2``);
    ``scaled``: row norms from 1e-2 to 1e2; ``conflict``: +/- one shared gradient plus noise."""
    g = torch.Generator().manual_seed(1000 * n + seed)
    rows = torch.randn(n, p, generator=g, dtype=D)
    if kind == "deficient":
        rows = torch.randn(n, 2, generator=g, dtype=D) @ torch.randn(2, p, generator=g, dtype=D)
    elif kind == "scaled":
        rows = rows * torch.logspace(-2, 2, n, dtype=D)[:, None]
    elif kind == "conflict":
        signs = torch.randn(n, 1, generator=g, dtype=D).sign()
        rows = signs * torch.randn(1, p, generator=g, dtype=D) + 0.5 * rows
    return rows


def build(name: str, n: int, **kwargs) -> GradientBalancer:
    balancer = METHODS[name](**kwargs)
    balancer.setup([Task(f"t{i}", kind="regression") for i in range(n)])
    return balancer


def direction(name: str, jac: torch.Tensor, **kwargs) -> torch.Tensor:
    n = jac.shape[0]
    weights = build(name, n, **kwargs).weights_from_gram(jac @ jac.T)
    assert weights.dtype == D and weights.shape == (n,)
    return weights @ jac


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --- the same direction as TorchJD -------------------------------------------------------------------


@pytest.mark.parametrize(("n", "kind", "seed"), CASES)
def test_aligned_mtl_matches_torchjd(n, kind, seed):
    jac = jacobian(n, kind, seed)
    for scale_mode in ("min", "median", "rmse"):
        ref = torchjd.AlignedMTL(scale_mode=scale_mode)(jac)
        assert rel(direction("aligned_mtl", jac, scale_mode=scale_mode), ref) < 1e-10


@pytest.mark.parametrize(("n", "kind", "seed"), CASES)
def test_upgrad_matches_torchjd(n, kind, seed):
    jac = jacobian(n, kind, seed)
    assert rel(direction("upgrad", jac), torchjd.UPGrad()(jac)) < 1e-8


@pytest.mark.parametrize(("n", "kind"), [(12, "iid"), (12, "deficient"), (32, "conflict"), (32, "scaled")])
def test_upgrad_matches_torchjd_beyond_enumeration(n, kind):
    assert n > ENUMERATE_MAX  # the interior-point path of nonneg_qp
    jac = jacobian(n, kind)
    assert rel(direction("upgrad", jac), torchjd.UPGrad()(jac)) < 1e-8


@pytest.mark.parametrize(
    ("n", "kind", "seed"),
    [
        (2, "iid", 0),
        (2, "iid", 1),
        (3, "iid", 0),
        (3, "duplicate", 0),
        (5, "iid", 0),
        (5, "duplicate", 0),
        (8, "iid", 0),
        (8, "duplicate", 0),
    ],
)
def test_nash_mtl_matches_torchjd(n, kind, seed):
    """TorchJD's cvxpy/ECOS sequence fails on two identical tasks and on norms 1e-2 vs 1e2 (its alpha stays
    far from G alpha = 1/alpha); those are covered by the bargaining-condition tests below."""
    jac = jacobian(n, "iid", seed)
    if kind == "duplicate":  # rank-deficient, but a solution exists (no non-negative null combination)
        jac[-1] = jac[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cvxpy's solver warnings
        ref = torchjd.NashMTL(n_tasks=n, max_norm=0.0)(jac)
    assert rel(direction("nash_mtl", jac, max_norm=0.0), ref) < 1e-6
    # max_norm=1 (the official clipping, TorchJD's default): |d| = sqrt(T) > 1 at the solution, so d/|d|.
    assert rel(direction("nash_mtl", jac), ref / ref.norm()) < 1e-6


@pytest.mark.parametrize(("n", "kind", "seed"), CASES)
def test_cagrad_matches_torchjd(n, kind, seed):
    jac = jacobian(n, kind, seed)
    gram = jac @ jac.T
    ours = build("cagrad", n).weights_from_gram(gram)
    theirs = torchjd.CAGradWeighting(c=0.5)(gram)
    assert rel(ours @ jac, theirs @ jac) < 1e-3

    # The dual objective g_w . g0 + c |g0| |g_w| over the simplex, w recovered from the weights.
    def objective(weights: torch.Tensor) -> float:
        w = (weights - 1 / n) / (weights - 1 / n).sum()
        g0, gw = jac.mean(0), w @ jac
        return float(gw @ g0 + 0.5 * g0.norm() * gw.norm())

    assert objective(ours) <= objective(theirs) + 1e-12 * float(gram.trace())


def test_preferences_match_torchjd():
    jac = jacobian(4, "iid", 7)
    pref = {"t0": 0.1, "t1": 0.2, "t2": 0.3, "t3": 0.4}
    ref_pref = torch.tensor(list(pref.values()), dtype=D)
    ours = direction("upgrad", jac, pref_vector=pref)
    assert rel(ours, torchjd.UPGrad(pref_vector=ref_pref)(jac)) < 1e-8
    ours = direction("aligned_mtl", jac, pref_vector=pref)
    assert rel(ours, torchjd.AlignedMTL(pref_vector=ref_pref)(jac)) < 1e-10


# --- optimality conditions ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [5, 12, 32])
@pytest.mark.parametrize("kind", ["iid", "deficient", "scaled", "conflict"])
def test_nonneg_qp_satisfies_kkt(n, kind):
    """x >= 0, A x + c >= 0, x . (A x + c) = 0: by enumeration up to 10 variables, interior point beyond."""
    jac = jacobian(n, kind)
    gn, _, _ = normalized_gram(jac @ jac.T)
    matrix = gn + 1e-4 * torch.eye(n, dtype=D)
    linear = torch.cat([matrix, -torch.rand(3, n, generator=torch.Generator().manual_seed(n), dtype=D)])
    x = nonneg_qp(matrix, linear)
    slack = x @ matrix + linear
    size = x.abs().amax(1, keepdim=True) + linear.abs().amax(1, keepdim=True)  # rows differ in scale
    assert (x >= 0).all()
    assert (slack >= -1e-12 * size).all()
    assert ((x * slack).abs() <= 1e-12 * size * size).all()


@pytest.mark.parametrize(
    ("n", "kind"), [(3, "iid"), (5, "conflict"), (8, "deficient"), (16, "iid"), (32, "scaled")]
)
def test_upgrad_direction_conflicts_with_no_task(n, kind):
    """J d >= 0: exactly up to the ridge, since (G/tr + eps I) v_i >= 0 gives G w >= -eps tr(G) w."""
    jac = jacobian(n, kind)
    for reg_eps in (1e-4, 1e-10):
        gram = jac @ jac.T
        w = build("upgrad", n, reg_eps=reg_eps).weights_from_gram(gram)
        assert (gram @ w >= -reg_eps * gram.trace() * w - 1e-12 * gram.trace() * w.abs().max()).all()
        assert (w >= 0).all()


@pytest.mark.parametrize(
    ("n", "kind"),
    [(2, "iid"), (3, "deficient"), (5, "conflict"), (8, "scaled"), (16, "iid"), (32, "conflict")],
)
def test_cagrad_satisfies_kkt(n, kind):
    """|d - g0| = c |g0|, and the tasks with w > 0 are the worst ones: g_i . d = min_j g_j . d."""
    jac = jacobian(n, kind)
    c = 0.5
    w = build("cagrad", n, c=c).weights_from_gram(jac @ jac.T)
    if (w == 0).all():  # |g_w| < norm_eps: "Pareto-stationary", zero weights, as TorchJD
        assert (torchjd.CAGradWeighting(c=c)(jac @ jac.T) == 0).all()
        return
    d, g0 = w @ jac, jac.mean(0)
    assert float((d - g0).norm()) == pytest.approx(c * float(g0.norm()), rel=1e-9)
    gains = jac @ d
    active = (w - 1 / n) > 1e-9 * (w - 1 / n).sum()
    assert active.any() and (w - 1 / n >= 0).all()
    scale = float(jac.norm(dim=1).max() * d.norm())
    assert float(gains[active].max() - gains.min()) <= 1e-9 * scale


@pytest.mark.parametrize(
    ("n", "kind"), [(2, "iid"), (3, "conflict"), (5, "scaled"), (8, "iid"), (16, "conflict"), (32, "iid")]
)
def test_nash_mtl_satisfies_bargaining_condition(n, kind):
    jac = jacobian(n, kind)
    gram = jac @ jac.T
    alpha = build("nash_mtl", n, max_norm=0.0).weights_from_gram(gram)
    assert (alpha > 0).all()
    torch.testing.assert_close(alpha * (gram @ alpha), torch.ones(n, dtype=D), rtol=0, atol=1e-9)


def test_aligned_mtl_balances_the_gradients():
    """With one-hot preferences the weights are the columns of B: B^T G B = lambda_min I (full rank)."""
    jac = jacobian(4, "scaled")
    gram = jac @ jac.T
    one_hot = [{f"t{i}": float(i == k) for i in range(4)} for k in range(4)]
    columns = [build("aligned_mtl", 4, pref_vector=pref).weights_from_gram(gram) for pref in one_hot]
    balance = torch.stack(columns, 1)
    expected = torch.linalg.eigvalsh(gram)[0] * torch.eye(4, dtype=D)
    torch.testing.assert_close(
        balance.T @ gram @ balance, expected, rtol=1e-9, atol=1e-9 * float(expected[0, 0])
    )


def test_cagrad_rescale_follows_the_official_code():
    jac = jacobian(3)
    base = direction("cagrad", jac, c=0.4)
    torch.testing.assert_close(direction("cagrad", jac, c=0.4, rescale=1), base / 1.16)
    torch.testing.assert_close(direction("cagrad", jac, c=0.4, rescale=2), base / 1.4)
    torch.testing.assert_close(direction("cagrad", jac, c=0.0), jac.mean(0))


# --- robustness ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(METHODS))
def test_scale_invariant_over_the_fp16_range(name):
    """Only relative thresholds: scaling the gradients by 2^+-16 scales the direction (Nash: keeps it)."""
    jac = jacobian(5, "conflict")
    kwargs = {"max_norm": 0.0} if name == "nash_mtl" else {}
    ref = direction(name, jac, **kwargs)
    for k in (2.0**-16, 2.0**16):
        expected = ref if name == "nash_mtl" else k * ref
        assert rel(direction(name, k * jac, **kwargs), expected) < 1e-9


@pytest.mark.parametrize("name", list(METHODS))
def test_zero_and_duplicated_rows(name):
    jac = jacobian(5)
    jac[1] = 0.0  # a task with no gradient
    jac[3] = jac[2]  # two identical tasks
    gram = jac @ jac.T
    w = build(name, 5).weights_from_gram(gram)
    assert torch.isfinite(w).all()
    if name == "nash_mtl":  # weight 0 for the zero gradient, the bargaining condition on the others
        alpha = build(name, 5, max_norm=0.0).weights_from_gram(gram)
        keep = [0, 2, 3, 4]
        assert float(alpha[1]) == 0.0
        torch.testing.assert_close((alpha * (gram @ alpha))[keep], torch.ones(4, dtype=D), rtol=0, atol=1e-9)
        assert float(alpha[2]) == pytest.approx(float(alpha[3]), rel=1e-9)
    if name == "upgrad":
        assert (gram @ w >= -1e-4 * gram.trace() * w).all()


@pytest.mark.parametrize("name", list(METHODS))
def test_degenerate_grams_give_finite_or_nan_weights_without_raising(name):
    zeros = build(name, 3).weights_from_gram(torch.zeros(3, 3, dtype=D))
    assert torch.isfinite(zeros).all()
    bad = torch.eye(3, dtype=D)
    bad[0, 1] = bad[1, 0] = torch.inf  # an fp16 overflow: NaN weights make the GradScaler skip the step
    assert torch.isnan(build(name, 3).weights_from_gram(bad)).all()


@pytest.mark.parametrize("name", list(METHODS))
def test_float32_gram_and_single_task(name):
    jac = jacobian(4)
    w64 = build(name, 4).weights_from_gram(jac @ jac.T)
    w32 = build(name, 4).weights_from_gram((jac @ jac.T).float())
    assert w32.dtype == D
    torch.testing.assert_close(w32, w64, rtol=1e-5, atol=1e-6 * float(w64.abs().max()))
    one = jac[:1]
    w = build(name, 1).weights_from_gram(one @ one.T)
    expected = {"cagrad": 1.5, "nash_mtl": 1 / float(one.norm()), "aligned_mtl": 1.0, "upgrad": 1.0}[name]
    assert float(w[0]) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("name", list(METHODS))
def test_no_host_synchronisation(name, monkeypatch):
    """The step never reads a tensor value back into Python (``.item()``, ``float(t)``, ``if t:``...)."""
    jac = jacobian(12 if name == "upgrad" else 5, "conflict")  # UPGrad: the interior-point path too
    balancer = build(name, jac.shape[0])
    gram = jac @ jac.T

    def refuse(*args, **kwargs):
        raise AssertionError("host synchronisation")

    for attr in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, attr, refuse)
    w = balancer.weights_from_gram(gram)
    monkeypatch.undo()
    assert torch.isfinite(w).all()


# --- Nash-MTL's warm start --------------------------------------------------------------------------


def test_nash_mtl_warm_start_is_used_and_round_trips_through_state_dict():
    jac = jacobian(6, "conflict")
    moved = jac + 0.01 * jacobian(6, "iid", 5)
    gram, gram2 = jac @ jac.T, moved @ moved.T

    def residual(alpha: torch.Tensor, g: torch.Tensor) -> float:
        return float((alpha * (g @ alpha) - 1).abs().max())

    warm = build("nash_mtl", 6, max_norm=0.0)
    warm.weights_from_gram(gram)
    assert (warm.alpha > 0).all() and warm.alpha.dtype == D
    state = warm.state_dict()
    assert set(state) == {"calls", "cached_weights", "cached_mask", "alpha"}

    restored = build("nash_mtl", 6, max_norm=0.0, newton_steps=1)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.alpha, warm.alpha)
    cold = build("nash_mtl", 6, max_norm=0.0, newton_steps=1)
    # One Newton step from the previous solution is close; from scratch it is not.
    assert residual(restored.weights_from_gram(gram2), gram2) < 1e-2
    assert residual(cold.weights_from_gram(gram2), gram2) > 1e-1


def test_nash_mtl_state_is_indexed_by_task_name():
    balancer = build("nash_mtl", 3, max_norm=0.0)
    gram = torch.diag(torch.tensor([1.0, 0.0, 4.0], dtype=D))  # |g| = 1 and 2; t1 absent (a zero row)
    alpha = balancer.weights_from_gram(gram, torch.tensor([True, False, True]))
    torch.testing.assert_close(alpha, torch.tensor([1.0, 0.0, 0.5], dtype=D))
    torch.testing.assert_close(balancer.alpha, torch.tensor([1.0, 0.0, 0.5], dtype=D))


# --- construction ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(METHODS))
def test_registered_and_rebuilt_from_spec(name):
    assert name in list_balancers()
    balancer = create_balancer(name)
    assert isinstance(balancer, METHODS[name]) and balancer.linear
    rebuilt = create_balancer(balancer.spec())
    assert rebuilt.config() == balancer.config()


def test_configs_round_trip_non_defaults():
    for balancer in (
        CAGrad(c=0.2, rescale=1, mode="features"),
        NashMTL(max_norm=2.0, newton_steps=5, update_every=4),
        AlignedMTL(pref_vector={"a": 2.0, "b": 1.0}, scale_mode="median"),
        UPGrad(pref_vector={"a": 0.5, "b": 0.5}, reg_eps=1e-6),
    ):
        config = balancer.config()
        assert create_balancer(balancer.spec()).config() == config
        assert {k: config[k] for k in ("mode", "update_every")} == {
            "mode": balancer.mode,
            "update_every": balancer.update_every,
        }


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: CAGrad(c=-1.0), "c must be >= 0"),
        (lambda: CAGrad(rescale=3), "rescale must be one of"),
        (lambda: NashMTL(max_norm=-1.0), "max_norm must be >= 0"),
        (lambda: NashMTL(newton_steps=0), "newton_steps must be >= 1"),
        (lambda: AlignedMTL(scale_mode="max"), "scale_mode must be one of"),
        (lambda: UPGrad(reg_eps=0.0), "reg_eps must be > 0"),
        (lambda: UPGrad(pref_vector={"a": -1.0}), "must be >= 0"),
        (lambda: build("upgrad", 2, pref_vector={"t0": 1.0, "x": 1.0}), r"unknown \['x'\], missing \['t1'\]"),
        (lambda: build("aligned_mtl", 2, pref_vector={"t0": 1.0}), r"missing \['t1'\]"),
    ],
)
def test_invalid_arguments_are_explained(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_pref_vector_must_be_a_mapping():
    with pytest.raises(TypeError, match="must map task names to weights"):
        UPGrad(pref_vector=[0.5, 0.5])  # type: ignore[arg-type]
