"""Small solvers on ``T x T`` Gram matrices, shared by the gradient aggregators (CAGrad, UPGrad, Nash-MTL,
Aligned-MTL), and their preference-vector helpers.

Everything here runs in torch on the Gram's device and dtype (float64), with a fixed amount of work: no
host round-trip, no data-dependent loop exit, and only the ``_ex`` linear-algebra variants (which do not
check for errors, hence do not synchronise). Thresholds are relative: callers pass Gram matrices
normalised to unit trace (:func:`normalized_gram`), so every constant below is a fraction of the
gradients' scale, whatever the AMP loss scale or the magnitude of the losses.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

#: Up to this many tasks, :func:`nonneg_qp` enumerates every support (exact, one batched factorisation);
#: beyond, it runs an interior-point method and polishes its result on the support it found.
ENUMERATE_MAX = 10
#: Interior-point iterations of :func:`nonneg_qp` for more than ``ENUMERATE_MAX`` tasks, then exact solves
#: on the support they identified and on its active-set refinements.
IPM_STEPS = 14
POLISH_STEPS = 2


def normalized_gram(gram: Tensor, present: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(G / trace(G), trace(G), finite)`` in float64, symmetrised, with the rows and columns of the tasks
    that are not ``present`` (bool ``[T]``; ``None``: all present) set to zero.

    A non-finite Gram (fp16 overflow) is replaced by zeros, so that no solver raises or loops on NaN;
    ``finite`` lets the caller return NaN weights, which make the GradScaler skip the step.

    Example:
        >>> gn, trace, finite = normalized_gram(torch.tensor([[4.0, 1.0], [1.0, 4.0]]))
        >>> gn, trace, finite
        (tensor([[0.5000, 0.1250],
                [0.1250, 0.5000]], dtype=torch.float64), tensor(8., dtype=torch.float64), tensor(True))
    """
    g = gram.double()
    finite = torch.isfinite(g).all()
    keep = finite if present is None else finite & present[:, None] & present
    twice = torch.where(keep, g + g.mT, 0.0)  # 2 G, symmetric
    trace2 = torch.trace(twice)
    return twice / trace2.clamp_min(torch.finfo(g.dtype).tiny), trace2 * 0.5, finite


def masked_cholesky(matrix: Tensor, mask: Tensor) -> Tensor:
    """Cholesky factor of ``matrix`` restricted to ``mask`` (identity elsewhere), batched over ``mask``.

    ``matrix``: ``T x T`` symmetric positive definite; ``mask``: bool ``(..., T)``. Solving with the factor
    (:func:`cho_solve`) gives ``x_S = matrix_SS^-1 r_S`` and ``x = r`` off the mask.
    """
    both = mask[..., :, None] & mask[..., None, :]
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    return torch.linalg.cholesky_ex(torch.where(both, matrix, eye))[0]


def cho_solve(factor: Tensor, rhs: Tensor) -> Tensor:
    """``(L L^T)^-1 rhs`` for a lower-triangular ``factor`` (two triangular solves, batched).

    Not ``torch.cholesky_solve``, which checks its result on the host (a synchronisation)."""
    half = torch.linalg.solve_triangular(factor, rhs, upper=False)
    return torch.linalg.solve_triangular(factor.mT, half, upper=True)


@functools.cache
def _supports(n: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Every subset of ``n`` variables, built once per ``(n, device, dtype)``: ``-mask`` as ``(2^n, n, 1)``,
    ``mask_i mask_j`` and the identity off the mask as ``(2^n, n, n)`` (so that the restriction of a matrix to
    every support, identity elsewhere, is one ``addcmul``)."""
    idx = torch.arange(2**n, device=device)
    mask = ((idx[:, None] >> torch.arange(n, device=device)) & 1).to(dtype)  # (2^n, n)
    eye = torch.eye(n, dtype=dtype, device=device)
    return -mask[:, :, None], mask[:, :, None] * mask[:, None, :], eye * (1 - mask)[:, None, :]


def nonneg_qp(
    matrix: Tensor, linear: Tensor, ipm_steps: int = IPM_STEPS, ridge: Tensor | None = None
) -> Tensor:
    """``x >= 0`` minimising ``x^T A x / 2 + c^T x`` for every row ``c`` of ``linear``.

    ``matrix`` (``A``): ``T x T`` symmetric positive definite, of order 1 (a unit-trace Gram plus a ridge);
    ``linear``: ``(B, T)``. Returns ``(B, T)``. The solution is the unique ``x`` with
    ``min(x, A x + c) = 0``: up to :data:`ENUMERATE_MAX` variables every support is tried at once and the
    candidate with the smallest residual wins (exact); beyond, ``ipm_steps`` Mehrotra interior-point
    iterations, then exact solves on the support they identified and :data:`POLISH_STEPS` - 1 primal-dual
    active-set refinements of it; the candidate with the smallest residual wins.

    ``ridge`` (length ``T``, optional): the part of ``A``'s diagonal that is only there to keep every
    support's system definite. Each candidate is then refined once towards the problem without it,
    ``x_S += A_SS^-1 (ridge x)_S``, which removes its effect to first order.

    Example:
        >>> a = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> nonneg_qp(a, torch.tensor([[-2.0, 1.0]], dtype=torch.float64))  # the 2nd bound is active
        tensor([[1.0000, 0.0000]], dtype=torch.float64)
    """
    n, tiny = matrix.shape[-1], torch.finfo(matrix.dtype).tiny
    # x = D u with D = diag(A)^-1/2 keeps x >= 0 and gives D A D a unit diagonal; the solution is
    # homogeneous in c, so each row is also solved at unit size, whatever the scale of each problem.
    inv_diag = matrix.diagonal().clamp_min(tiny).reciprocal()
    unit = inv_diag.sqrt()
    matrix = matrix * torch.outer(unit, unit)
    ridge = None if ridge is None else (ridge * inv_diag)[:, None]  # in D A D's units, as a column
    linear = linear * unit
    scale = torch.linalg.vector_norm(linear, ord=torch.inf, dim=-1, keepdim=True).clamp_min(tiny)
    linear = linear / scale
    if n <= ENUMERATE_MAX:  # one factor per support, shared by every right-hand side
        neg_mask, outer, off = _supports(n, matrix.device, matrix.dtype)
        factor = torch.linalg.cholesky_ex(torch.addcmul(off, matrix, outer))[0]
        solution = cho_solve(factor, neg_mask * linear.mT)  # (2^n, n, B), 0 off each support
        if ridge is not None:
            solution = solution + cho_solve(factor, ridge * solution)
        candidates = solution.mT  # (2^n, B, n)
    else:  # exact solves on the support the interior point found, refined by active-set steps
        x, z = _interior_point(matrix, linear, ipm_steps)
        support, polished = x > z, []
        for _ in range(POLISH_STEPS):
            factor = masked_cholesky(matrix, support)
            solution = cho_solve(factor, -(linear * support).unsqueeze(-1))  # (B, n, 1)
            if ridge is not None:
                solution = solution + cho_solve(factor, ridge * solution)
            polished.append(solution.squeeze(-1))
            support = polished[-1] - (polished[-1] @ matrix + linear) > 0  # primal-dual active set rule
        candidates = torch.stack([*polished, x])  # (POLISH_STEPS + 1, B, n); ties go to polished ones
    if ridge is not None:  # the candidates are judged on the problem without the ridge
        matrix = matrix - torch.diag(ridge[:, 0])
    slack = torch.matmul(candidates, matrix).add_(linear)
    residual = torch.linalg.vector_norm(torch.minimum(candidates, slack), ord=torch.inf, dim=-1)
    residual = residual / torch.linalg.vector_norm(candidates, ord=torch.inf, dim=-1).add_(1)
    best = torch.nan_to_num(residual, nan=torch.inf).argmin(0)  # (B,)
    best_x = candidates[best, torch.arange(candidates.shape[1], device=best.device)]
    return torch.where(best_x > 0, best_x, 0.0) * (scale * unit)


def _interior_point(matrix: Tensor, linear: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Mehrotra predictor-corrector iterations for ``min x^T A x / 2 + c^T x, x >= 0``: ``(x, z)`` with
    ``z ~ A x + c`` the multipliers, both positive; ``x > z`` marks the variables away from their bound.

    ``x`` and ``z`` are kept stacked (``xz[0]``, ``xz[1]``), so that their step lengths and updates are one
    operation each."""
    xz = torch.ones((2, *linear.shape), dtype=linear.dtype, device=linear.device)
    x, z = xz.unbind(0)
    for _ in range(steps):
        ratio = z / x
        factor = torch.linalg.cholesky_ex(matrix + torch.diag_embed(ratio))[0]
        rhs = torch.addmm(linear, x, matrix, beta=-1, alpha=-1)  # -(A x + c - z) - z
        dx = cho_solve(factor, rhs.unsqueeze(-1)).squeeze(-1)  # affine-scaling (predictor) step
        dxz = torch.stack([dx, torch.addcmul(z, ratio, dx).neg_()])  # dz = -z - (z / x) dx
        affine = torch.addcmul(xz, _max_steps(xz, dxz), dxz).prod(0).mean(-1, keepdim=True)
        gap = xz.prod(0).mean(-1, keepdim=True)
        centre = torch.addcmul((affine / gap).clamp(0.0, 1.0).pow_(3).mul_(gap), dxz[0], dxz[1], value=-1)
        centre = centre / x
        dx = cho_solve(factor, (rhs + centre).unsqueeze(-1)).squeeze(-1)  # corrector
        dxz = torch.stack([dx, torch.addcmul(centre - z, ratio, dx, value=-1)])
        xz = torch.addcmul(xz, _max_steps(xz, dxz), dxz, value=0.99)
        x, z = xz.unbind(0)
    return x, z


def _max_steps(xz: Tensor, dxz: Tensor) -> Tensor:
    """The longest steps ``t <= 1`` keeping ``x + t dx`` and ``z + t dz`` non-negative (per row): ``(2, B, 1)``."""
    limits = xz / dxz.neg().clamp_min(torch.finfo(xz.dtype).tiny)  # huge where the step increases
    return limits.amin(-1, keepdim=True).clamp_max(1.0)


def presence(present: Tensor | None, gram: Tensor) -> Tensor:
    """The presence mask of the ``T`` tasks of ``gram`` (``T x T``): ``present`` itself, or every task when
    ``None``, as a bool tensor on ``gram``'s device."""
    if present is None:
        return torch.ones(gram.shape[-1], dtype=torch.bool, device=gram.device)
    return present


def random_orders(generator: torch.Generator, n: int, device: torch.device) -> Tensor:
    """``n x (n - 1)``: row ``i`` holds the tasks ``j != i`` in a uniformly random order (the order in which
    task ``i`` visits the others in PCGrad and GradVac), all drawn at once from ``generator``.

    Example:
        >>> order = random_orders(torch.Generator().manual_seed(0), 4, torch.device("cpu"))
        >>> order.shape, bool((order != torch.arange(4)[:, None]).all())
        (torch.Size([4, 3]), True)
    """
    keys = torch.rand(n, n, generator=generator, device=device).fill_diagonal_(2.0)  # i itself sorts last
    return keys.argsort(1)[:, : n - 1]


def preference_tensor(pref_vector: Mapping[str, float] | None, task_names: Sequence[str]) -> Tensor | None:
    """``pref_vector`` as a float64 tensor in ``task_names`` order (``None`` stays ``None``), built once at
    setup so that no step copies it from the host."""
    if pref_vector is None:
        return None
    return torch.tensor([pref_vector[n] for n in task_names], dtype=torch.float64)


def preferences(pref: Tensor | None, present: Tensor, like: Tensor) -> Tensor:
    """The preference weights of every task, as the method on the present tasks alone would take them:
    ``pref`` (from :func:`preference_tensor`) on the present tasks, 0 on the absent ones; by default ``1/K``
    on each of the ``K`` present tasks.

    Example:
        >>> present = torch.tensor([True, False, True])
        >>> preferences(None, present, torch.zeros((), dtype=torch.float64))
        tensor([0.5000, 0.0000, 0.5000], dtype=torch.float64)
        >>> preferences(torch.tensor([0.2, 0.3, 0.5]), present, torch.zeros((), dtype=torch.float64))
        tensor([0.2000, 0.0000, 0.5000], dtype=torch.float64)
    """
    mask = present.to(like.dtype)
    if pref is None:
        return mask / mask.sum().clamp_min(1.0)
    return pref.to(like) * mask


def check_preferences(
    owner: str, pref_vector: Mapping[str, float] | None, nonneg: bool
) -> dict[str, float] | None:
    if pref_vector is None:
        return None
    if not isinstance(pref_vector, Mapping):
        raise TypeError(
            f"{owner}: pref_vector must map task names to weights, e.g. {{'a': 0.7, 'b': 0.3}}; "
            f"got {type(pref_vector).__name__} {pref_vector!r}."
        )
    out = {str(k): float(v) for k, v in pref_vector.items()}
    if nonneg and any(v < 0 for v in out.values()):
        raise ValueError(f"{owner}: pref_vector weights must be >= 0, got {out}.")
    return out


def match_preferences(owner: str, pref_vector: Mapping[str, float] | None, names: Sequence[str]) -> None:
    if pref_vector is None:
        return
    unknown, missing = sorted(set(pref_vector) - set(names)), sorted(set(names) - set(pref_vector))
    if unknown or missing:
        raise ValueError(
            f"{owner}: pref_vector must name every task exactly: unknown {unknown}, missing {missing} "
            f"(tasks: {sorted(names)})."
        )
