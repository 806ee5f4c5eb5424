"""``db_mtl``: log-transformed losses, and EMA task gradients rescaled to the largest norm."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_mtl.balancing.base import register_balancer
from lightning_mtl.balancing.gradient import GradientBalancer


@register_balancer("db_mtl")
class DBMTL(GradientBalancer):
    """Dual-Balancing MTL: balance loss scales with ``log L_t`` and gradient magnitudes by rescaling each
    task's (EMA) gradient to the largest norm: ``d = sum_t (max_k |m_k| / |m_t|) m_t``.

    Lin, Jiang, Ye, Zhang, Chen, Chen, Liu, Tsang & Kwok, 2023, "Dual-Balancing for Multi-Task
    Learning" (arXiv:2308.12029). The gradients are those of ``log(L_t + eps)``; ``m_t`` is an EMA of
    them, updated as in the authors' LibMTL code: ``m_t <- g_t + beta / k_t**beta_sigma * (m_t - g_t)``,
    with ``k_t`` the number of steps task ``t`` was present (a task absent from a step keeps ``m_t`` and
    ``k_t``, and stays out of ``d``).

    ``m`` is a ``T x P`` buffer (so a resumed run continues exactly); ``P`` is known at the first step only,
    so it starts as ``T x 0`` and a checkpoint of any ``P`` loads into a fresh instance. Needs parameter
    gradients (``supports_features = False``: an EMA over steps needs fixed coordinates, which the
    per-example feature gradients are not). Not linear in the current Jacobian: the logged weights are the
    implied ``<d, g_t> / |g_t|^2``.

    Args:
        beta: EMA rate (default 0.9, the authors' ``DB_beta``).
        beta_sigma: decay exponent of the EMA rate over steps (default 0.5; ``0``, LibMTL's command-line
            default, gives a constant rate ``beta``).
        eps: added to the losses before the log (default 1e-8, as the authors'); negative losses are
            clamped to 0 first, so keep losses non-negative.
        mode, update_every, jacobian, memory_budget_mb, seed: see
            :class:`~lightning_mtl.balancing.gradient.GradientBalancer`.

    Example:
        >>> import torch
        >>> from lightning_mtl import Task
        >>> db = DBMTL()
        >>> db.setup([Task("a", kind="regression"), Task("b", kind="regression")])
        >>> direction, _ = db.aggregate(torch.tensor([[3.0, 0.0], [0.0, 0.5]]))
        >>> direction  # m = 0.1 g after one step; both rescaled to the larger norm, 0.3
        tensor([0.3000, 0.3000])
        >>> db.grad_ema
        tensor([[0.3000, 0.0000],
                [0.0000, 0.0500]])
    """

    linear = False
    supports_features = False
    grad_ema: Tensor  # T x P, indexed like task_names (created in setup)
    steps: Tensor  # steps each task was present

    def __init__(
        self,
        beta: float = 0.9,
        beta_sigma: float = 0.5,
        eps: float = 1e-8,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if not 0.0 <= beta < 1.0 or beta_sigma < 0.0 or eps < 0.0:
            raise ValueError(
                f"DBMTL: need 0 <= beta < 1, beta_sigma >= 0 and eps >= 0; got beta={beta}, "
                f"beta_sigma={beta_sigma}, eps={eps}."
            )
        self.beta, self.beta_sigma, self.eps = float(beta), float(beta_sigma), float(eps)

    def setup(self, tasks: Sequence[object]) -> None:  # type: ignore[override]
        old_names, old_ema, old_steps = (
            list(self.task_names),
            getattr(self, "grad_ema", None),
            getattr(self, "steps", None),
        )
        super().setup(tasks)
        n, device = len(self.task_names), self.calls.device
        width = 0 if old_ema is None else old_ema.shape[1]
        ema = torch.zeros(n, width, device=device, dtype=torch.float32 if old_ema is None else old_ema.dtype)
        steps = torch.zeros(n, dtype=torch.long, device=device)
        if old_ema is not None and old_steps is not None:  # keep the state of the tasks that stay
            for name in set(old_names) & set(self.task_names):
                ema[self.task_names.index(name)] = old_ema[old_names.index(name)]
                steps[self.task_names.index(name)] = old_steps[old_names.index(name)]
        self.register_buffer("grad_ema", ema)
        self.register_buffer("steps", steps)

    def prepare_losses(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {name: torch.log(loss.clamp_min(0.0) + self.eps) for name, loss in losses.items()}

    def aggregate(self, jacobian: Tensor, present: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.grad_ema.shape[1] != jacobian.shape[1]:  # first step, or the shared parameters changed
            self.grad_ema = jacobian.new_zeros(len(self.task_names), jacobian.shape[1])
            self.steps.zero_()
        if present is None:
            present = torch.ones(jacobian.shape[0], dtype=torch.bool, device=jacobian.device)
        mask = present.to(jacobian.dtype)
        self.steps.add_(present.to(self.steps))
        rate = self.beta / self.steps.clamp_min(1).to(jacobian.dtype) ** self.beta_sigma
        # m <- g + rate (m - g) = lerp(m, g, 1 - rate) in place (no T x P temporary); weight 0 for an absent
        # task leaves its row exactly as it was
        ema = self.grad_ema.lerp_(jacobian.to(self.grad_ema.dtype), ((1 - rate) * mask)[:, None])
        sq = torch.linalg.vector_norm(ema, dim=1).square() * mask
        floor = 1e-12 * sq.sum() / mask.sum().clamp_min(1) + torch.finfo(sq.dtype).tiny
        norms = sq.clamp_min(floor).sqrt()
        scale = torch.where(sq > floor, norms.max() / norms, 0.0)  # zero EMA rows and absent tasks stay out
        direction = (scale.to(ema.dtype) @ ema).to(jacobian.dtype)
        return direction, self.implied_weights(jacobian, direction) * mask

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        saved = state_dict.get(prefix + "grad_ema")
        current = getattr(self, "grad_ema", None)
        if (
            isinstance(saved, Tensor)
            and current is not None
            and saved.dim() == 2
            and saved.shape[0] == current.shape[0]
        ):
            self.grad_ema = torch.zeros(saved.shape, dtype=saved.dtype, device=current.device)
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[arg-type]
