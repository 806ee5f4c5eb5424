"""Small solvers on ``T x T`` Gram matrices, shared by the gradient aggregators (CAGrad, UPGrad, Nash-MTL,
Aligned-MTL), and their preference-vector helpers.

Everything here runs in torch on the Gram's device and dtype (float64), with a fixed amount of work: no
host round-trip, no data-dependent loop exit, and only the ``_ex`` linear-algebra variants (which do not
check for errors, hence do not synchronise). Thresholds are relative: callers pass Gram matrices
normalised to unit trace (:func:`normalized_gram`), so every constant below is a fraction of the
gradients' scale, whatever the AMP loss scale or the magnitude of the losses.
"""

from __future__ import annotations

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


def normalized_gram(gram: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(G / trace(G), trace(G), finite)`` in float64, symmetrised.

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
    g = torch.where(finite, g, torch.zeros_like(g))
    g = (g + g.mT) / 2
    trace = g.diagonal(dim1=-2, dim2=-1).sum(-1)
    return g / trace.clamp_min(torch.finfo(g.dtype).tiny), trace, finite


def masked_cholesky(matrix: Tensor, mask: Tensor) -> Tensor:
    """Cholesky factor of ``matrix`` restricted to ``mask`` (identity elsewhere), batched over ``mask``.

    ``matrix``: ``T x T`` symmetric positive definite; ``mask``: bool ``(..., T)``. Solving with the factor
    (:func:`cho_solve`) gives ``x_S = matrix_SS^-1 r_S`` and ``x = r`` off the mask.
    """
    m = mask.to(matrix.dtype)
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    masked = matrix * (m[..., :, None] * m[..., None, :]) + eye * (1 - m)[..., None, :]
    return torch.linalg.cholesky_ex(masked)[0]


def cho_solve(factor: Tensor, rhs: Tensor) -> Tensor:
    """``(L L^T)^-1 rhs`` for a lower-triangular ``factor`` (two triangular solves, batched)."""
    half = torch.linalg.solve_triangular(factor, rhs, upper=False)
    return torch.linalg.solve_triangular(factor.mT, half, upper=True)


def nonneg_qp(matrix: Tensor, linear: Tensor) -> Tensor:
    """``x >= 0`` minimising ``x^T A x / 2 + c^T x`` for every row ``c`` of ``linear``.

    ``matrix`` (``A``): ``T x T`` symmetric positive definite, of order 1 (a unit-trace Gram plus a ridge);
    ``linear``: ``(B, T)``. Returns ``(B, T)``. The solution is the unique ``x`` with
    ``min(x, A x + c) = 0``: up to :data:`ENUMERATE_MAX` variables every support is tried at once and the
    candidate with the smallest residual wins (exact); beyond, :data:`IPM_STEPS` Mehrotra interior-point
    iterations, then exact solves on the support they identified and :data:`POLISH_STEPS` - 1 primal-dual
    active-set refinements of it; the candidate with the smallest residual wins.

    Example:
        >>> a = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> nonneg_qp(a, torch.tensor([[-2.0, 1.0]], dtype=torch.float64))  # the 2nd bound is active
        tensor([[1.0000, 0.0000]], dtype=torch.float64)
    """
    n, tiny = matrix.shape[-1], torch.finfo(matrix.dtype).tiny
    # x = D u with D = diag(A)^-1/2 keeps x >= 0 and gives D A D a unit diagonal; the solution is
    # homogeneous in c, so each row is also solved at unit size, whatever the scale of each problem.
    unit = matrix.diagonal().clamp_min(tiny).rsqrt()
    matrix = matrix * unit[:, None] * unit
    linear = linear * unit
    scale = linear.abs().amax(-1, keepdim=True).clamp_min(tiny)
    linear = linear / scale
    if n <= ENUMERATE_MAX:  # one factor per support, shared by every right-hand side
        idx = torch.arange(2**n, device=matrix.device)
        supports = ((idx[:, None] >> torch.arange(n, device=matrix.device)) & 1).bool()  # (2^n, n)
        rhs = -(linear[None] * supports[:, None, :]).mT  # (2^n, n, B)
        candidates = cho_solve(masked_cholesky(matrix, supports), rhs).mT  # (2^n, B, n)
    else:  # exact solves on the support the interior point found, refined by active-set steps
        x, z = _interior_point(matrix, linear, IPM_STEPS)
        support, polished = x > z, []
        for _ in range(POLISH_STEPS):
            rhs = -(linear * support).unsqueeze(-1)
            polished.append(cho_solve(masked_cholesky(matrix, support), rhs).squeeze(-1))
            support = polished[-1] - (polished[-1] @ matrix + linear) > 0  # primal-dual active set rule
        candidates = torch.stack([*polished, x])  # (POLISH_STEPS + 1, B, n); ties go to polished ones
    residual = torch.minimum(candidates, candidates @ matrix + linear).abs().amax(-1)
    residual = residual / (1 + candidates.abs().amax(-1))
    best = torch.nan_to_num(residual, nan=torch.inf).argmin(0)  # (B,)
    best_x = candidates.gather(0, best[None, :, None].expand(1, *candidates.shape[1:]))[0]
    return torch.where(best_x > 0, best_x * scale * unit, 0.0)


def _interior_point(matrix: Tensor, linear: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Mehrotra predictor-corrector iterations for ``min x^T A x / 2 + c^T x, x >= 0``: ``(x, z)`` with
    ``z ~ A x + c`` the multipliers, both positive; ``x > z`` marks the variables away from their bound."""
    x = torch.ones_like(linear)
    z = torch.ones_like(linear)
    for _ in range(steps):
        ratio = z / x
        factor = torch.linalg.cholesky_ex(matrix + torch.diag_embed(ratio))[0]
        rhs = -(x @ matrix + linear)  # -(dual residual A x + c - z) - z
        dx = cho_solve(factor, rhs.unsqueeze(-1)).squeeze(-1)  # affine-scaling (predictor) step
        dz = -z - ratio * dx
        tx, tz = _max_steps(x, z, dx, dz)
        gap = (x * z).mean(-1, keepdim=True)
        sigma = (((x + tx * dx) * (z + tz * dz)).mean(-1, keepdim=True) / gap).clamp(0.0, 1.0) ** 3
        centre = sigma * gap - dx * dz
        dx = cho_solve(factor, (rhs + centre / x).unsqueeze(-1)).squeeze(-1)  # corrector
        dz = centre / x - z - ratio * dx
        tx, tz = _max_steps(x, z, dx, dz)
        x, z = x + 0.99 * tx * dx, z + 0.99 * tz * dz
    return x, z


def _max_steps(x: Tensor, z: Tensor, dx: Tensor, dz: Tensor) -> tuple[Tensor, Tensor]:
    """The longest steps ``t <= 1`` keeping ``x + t dx``, resp. ``z + t dz``, non-negative (per row)."""
    v, dv = torch.stack([x, z]), torch.stack([dx, dz])
    tx, tz = (-v / dv).masked_fill(dv >= 0, 1.0).amin(-1, keepdim=True).clamp_max(1.0)
    return tx, tz


def preferences(pref_vector: Mapping[str, float] | None, names: Sequence[str], like: Tensor) -> Tensor:
    """The preference weights of the tasks ``names`` (``1/T`` each by default), as a tensor like ``like``."""
    if pref_vector is None:
        return torch.full((len(names),), 1.0 / len(names), dtype=like.dtype, device=like.device)
    # A non-blocking copy from the host: no stream synchronisation, unlike torch.tensor(..., device=cuda).
    return torch.tensor([pref_vector[n] for n in names], dtype=like.dtype).to(like.device, non_blocking=True)


def task_positions(task_names: Sequence[str], names: Sequence[str], device: torch.device) -> Tensor:
    """Positions of ``names`` in ``task_names``, copied to ``device`` without a stream synchronisation."""
    return torch.tensor([task_names.index(n) for n in names]).to(device, non_blocking=True)


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
