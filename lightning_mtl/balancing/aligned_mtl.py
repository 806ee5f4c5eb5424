"""``aligned_mtl``: align the task gradients' principal components (condition number one)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_mtl.balancing._solvers import (
    check_preferences,
    match_preferences,
    normalized_gram,
    preference_tensor,
    preferences,
    presence,
)
from lightning_mtl.balancing.base import register_balancer
from lightning_mtl.balancing.gradient import GradientBalancer

if TYPE_CHECKING:
    from lightning_mtl.tasks import Task

SCALE_MODES = ("min", "median", "rmse")


@register_balancer("aligned_mtl")
class AlignedMTL(GradientBalancer):
    """Aligned-MTL: ``d = J^T B u`` with ``B = sqrt(s) G^(-1/2)`` (on the range of ``G``), so that the
    rescaled task gradients ``B J`` are orthogonal with equal norms ``sqrt(s)``.

    Senushkin et al., 2023, "Independent Component Alignment for Multi-Task Learning" (CVPR),
    Algorithm 1, as TorchJD's ``AlignedMTL()``: with ``G = V diag(lambda) V^T`` and ``lambda_1..r`` its
    eigenvalues above ``max(lambda) * T * eps`` (rank-deficient Grams drop the rest; ``G = 0`` gives
    ``B = I``), ``B = sqrt(s) V_r diag(lambda_r^-1/2) V_r^T`` and ``s`` the smallest (``"min"``), median
    (``"median"``, the lower one) or mean (``"rmse"``, the original code) kept eigenvalue. A closed form:
    one ``T x T`` eigendecomposition. ``torch.linalg.eigh`` checks its result on the host: the one
    synchronisation of any gradient method's step (there is no ``eigh_ex``). Absent tasks take no part
    (weight 0; their zero eigenvalues are never kept).

    Args:
        pref_vector: ``{task: u_t}`` for every task (the absent tasks' are ignored); default ``u = 1/K`` over
            the ``K`` tasks present in the step.
        scale_mode: ``"min"`` (default), ``"median"`` or ``"rmse"``.
        mode, update_every, jacobian, memory_budget_mb, seed: see
            :class:`~lightning_mtl.balancing.gradient.GradientBalancer`.

    Example:
        >>> import torch
        >>> gram = torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # |g_a| = 2, |g_b| = 1
        >>> AlignedMTL().weights_from_gram(gram)  # both rescaled to the smaller norm
        tensor([0.2500, 0.5000], dtype=torch.float64)
    """

    pref: Tensor | None  # pref_vector in task order (a buffer set by setup; None: 1/K each)

    def __init__(
        self,
        pref_vector: Mapping[str, float] | None = None,
        scale_mode: str = "min",
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if scale_mode not in SCALE_MODES:
            raise ValueError(f"AlignedMTL: scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}.")
        self.pref_vector = check_preferences(type(self).__name__, pref_vector, nonneg=False)
        self.register_buffer("pref", None, persistent=False)
        self.scale_mode = scale_mode

    def setup(self, tasks: Sequence[Task]) -> None:  # type: ignore[override]
        super().setup(tasks)
        match_preferences(type(self).__name__, self.pref_vector, self.task_names)
        pref = preference_tensor(self.pref_vector, self.task_names)
        self.pref = None if pref is None else pref.to(self.calls.device)

    def weights_from_gram(self, gram: Tensor, present: Tensor | None = None) -> Tensor:
        present = presence(present, gram)
        gn, _, finite = normalized_gram(gram, present)
        n = gn.shape[0]
        lam, vec = torch.linalg.eigh(gn)  # ascending; its error check reads one value on the host
        # TorchJD's rank threshold over the K present tasks, with the machine epsilon of the Gram as given (a
        # float32 Gram's rounding noise must not count as rank). Absent tasks add zero eigenvalues, never kept.
        eps = torch.finfo(gram.dtype if gram.is_floating_point() else gn.dtype).eps
        keep = lam > lam[-1] * eps * present.sum()
        rank = keep.sum()
        if self.scale_mode == "min":
            scale = torch.where(keep, lam, torch.inf).min()
        elif self.scale_mode == "median":  # the lower median of the kept (largest) eigenvalues
            position = (n - rank + (rank - 1).clamp_min(0) // 2).clamp_max(n - 1)
            scale = lam.index_select(0, position.view(1))[0]
        else:
            scale = torch.where(keep, lam, 0).sum() / rank.clamp_min(1)
        inv_sqrt = torch.where(keep, lam.clamp_min(torch.finfo(gn.dtype).tiny).rsqrt(), 0)
        balance = (vec * inv_sqrt) @ vec.T * torch.where(rank > 0, scale, 0).sqrt()
        eye = torch.eye(n, dtype=gn.dtype, device=gn.device)
        balance = torch.where(rank > 0, balance, eye)
        weights = torch.where(present, balance @ preferences(self.pref, present, gn), 0.0)
        return torch.where(finite, weights, torch.nan)
