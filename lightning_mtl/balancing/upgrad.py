"""``upgrad``: project every task gradient onto the dual cone of all of them, then average."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_mtl.balancing._solvers import (
    check_preferences,
    match_preferences,
    nonneg_qp,
    normalized_gram,
    preference_tensor,
    preferences,
    presence,
)
from lightning_mtl.balancing.base import register_balancer
from lightning_mtl.balancing.gradient import GradientBalancer

if TYPE_CHECKING:
    from lightning_mtl.tasks import Task


@register_balancer("upgrad")
class UPGrad(GradientBalancer):
    """Unconflicting projection of gradients: ``d = sum_i u_i pi(g_i)``, ``pi`` the projection onto the
    dual cone ``{x : J x >= 0}`` of the task gradients (so ``d`` conflicts with no task).

    Quinton & Rey, 2024, "Jacobian Descent for Multi-Objective Optimization" (arXiv:2406.16232).
    In Gram form (their Proposition 1), ``pi(g_i) = J^T v_i`` with ``v_i = argmin_{v >= e_i} v^T G v``, and
    the weights are ``w = sum_i u_i v_i``. As in TorchJD's ``UPGrad()``, ``G`` is first divided by its trace
    and ``reg_eps * I`` is added (a unique, well-conditioned problem); unlike TorchJD, a Gram whose trace is
    below 1e-4 is not replaced by 0 (no absolute threshold). The ``T`` box-constrained QPs are
    solved together and exactly by :func:`~lightning_mtl.balancing._solvers.nonneg_qp` (every support at
    once up to 10 tasks; interior point + exact polishing beyond).

    Args:
        pref_vector: ``{task: u_t >= 0}`` for every task (the absent tasks' are ignored); default ``u = 1/K``
            over the ``K`` tasks present in the step.
        reg_eps: ridge added to the trace-normalised Gram (TorchJD's default ``1e-4``; must be > 0).
        mode, update_every, jacobian, memory_budget_mb, seed: see
            :class:`~lightning_mtl.balancing.gradient.GradientBalancer`.

    Example:
        >>> import torch
        >>> jac = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)
        >>> w = UPGrad().weights_from_gram(jac @ jac.T)
        >>> w @ jac  # conflicts with neither row: jac @ d >= 0
        tensor([0.2929, 1.9004, 1.9004], dtype=torch.float64)
    """

    pref: Tensor | None  # pref_vector in task order (a buffer set by setup; None: 1/K each)

    def __init__(
        self,
        pref_vector: Mapping[str, float] | None = None,
        reg_eps: float = 1e-4,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.pref_vector = check_preferences(type(self).__name__, pref_vector, nonneg=True)
        self.register_buffer("pref", None, persistent=False)
        if not float(reg_eps) > 0:
            raise ValueError(f"UPGrad: reg_eps must be > 0 (TorchJD's default is 1e-4), got {reg_eps}.")
        self.reg_eps = float(reg_eps)

    def setup(self, tasks: Sequence[Task]) -> None:  # type: ignore[override]
        super().setup(tasks)
        match_preferences(type(self).__name__, self.pref_vector, self.task_names)
        pref = preference_tensor(self.pref_vector, self.task_names)
        self.pref = None if pref is None else pref.to(self.calls.device)

    def weights_from_gram(self, gram: Tensor, present: Tensor | None = None) -> Tensor:
        present = presence(present, gram)
        gn, _, finite = normalized_gram(gram, present)
        regularized = torch.diagonal_scatter(gn, gn.diagonal() + self.reg_eps)
        # Row i: v_i - e_i = argmin_{x >= 0} (e_i + x)^T A (e_i + x), whose linear term is A e_i. An absent task
        # is decoupled (its row of A is reg_eps e_i): no present task's projection moves along it.
        projections = nonneg_qp(regularized, regularized)
        prefs = preferences(self.pref, present, gn)
        weights = torch.addmv(prefs, projections.T, prefs)  # u @ (X + I)
        return torch.where(finite, weights, torch.nan)
