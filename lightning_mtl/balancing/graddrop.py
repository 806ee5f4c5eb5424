"""``graddrop``: keep, per coordinate, only the gradients of one randomly chosen sign."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_mtl.balancing.base import register_balancer
from lightning_mtl.balancing.gradient import GradientBalancer


@register_balancer("graddrop")
class GradDrop(GradientBalancer):
    """Gradient sign dropout: per coordinate, keep the positive task gradients with probability ``P`` (the
    share of positive sign), else the negative ones; ``d = sum_t M_t * g_t``.

    Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, 2020, "Just Pick a Sign: Optimizing Deep
    Multitask Models with Gradient Sign Dropout" (NeurIPS). ``P = (1 + sum_t g_t / sum_t |g_t|) / 2``
    elementwise, ``U ~ Uniform(0, 1)`` from :meth:`generator` (the same on every rank and after a resume);
    ``M_t = 1`` where ``g_t > 0`` and ``P > U`` or ``g_t < 0`` and ``P < U``.

    Not a linear combination of the task gradients (``linear = False``): the logged weights are the
    implied ``<d, g_t> / |g_t|^2``. ``mode="features"`` by default because the paper applies GradDrop to
    the gradients of the activations shared by the heads, not to the parameter gradients (LibMTL only
    supports that mode too); ``mode="params"`` is the variant TorchJD implements. The paper's sign
    correction for batch-separated activations (``sum over the batch of sign(A) * grad``) is not applied:
    ``P`` is computed per element of the flattened feature gradients.

    Args:
        leak: how much of each task gradient always passes, ``M_t -> leak_t + (1 - leak_t) M_t``; a number
            for every task or a ``{task: leak}`` mapping (missing tasks: 0). Default 0, the setting of the
            paper's experiments (its leak is only for tasks one wants to keep unfiltered).
        mode, update_every, jacobian, memory_budget_mb, seed: see
            :class:`~lightning_mtl.balancing.gradient.GradientBalancer`.

    Example:
        >>> import torch
        >>> drop = GradDrop()
        >>> jac = torch.tensor([[1.0, -2.0, 3.0], [4.0, -5.0, -3.0]])
        >>> direction, weights = drop.aggregate(jac, ["a", "b"])
        >>> direction[:2]  # the first two coordinates agree in sign: kept whatever U
        tensor([ 5., -7.])
        >>> direction[2].abs()  # P = 0.5: one of the two signs survives (+3 or -3)
        tensor(3.)
    """

    linear = False

    def __init__(
        self,
        leak: float | Mapping[str, float] = 0.0,
        mode: str = "features",
        update_every: int = 1,
        jacobian: str = "loop",
        memory_budget_mb: float = 2048.0,
        seed: int = 0,
    ) -> None:
        super().__init__(mode, update_every, jacobian, memory_budget_mb, seed)
        values = list(leak.values()) if isinstance(leak, Mapping) else [leak]
        if not all(0.0 <= float(v) <= 1.0 for v in values):
            raise ValueError(f"GradDrop: leak must be in [0, 1], got {leak!r}.")
        self.leak = {k: float(v) for k, v in leak.items()} if isinstance(leak, Mapping) else float(leak)

    def aggregate(self, jacobian: Tensor, names: Sequence[str]) -> tuple[Tensor, Tensor]:
        # M_t keeps g_t where its sign is the chosen one, so the kept sum is the sum of the positive parts
        # (sum |g| + sum g) / 2 where the positive sign is chosen (P > U), of the negative parts
        # (sum g - sum |g|) / 2 where P < U, and 0 where P == U: two reductions, no T x P temporaries.
        total = jacobian.sum(0)
        mass = torch.linalg.vector_norm(jacobian, ord=1, dim=0)
        purity = 0.5 * (1 + total / mass.clamp_min(torch.finfo(mass.dtype).tiny))  # 0.5 where all are 0
        gen = self.generator(jacobian.device)
        draw = torch.rand(purity.shape, generator=gen, device=jacobian.device, dtype=jacobian.dtype)
        base: Tensor | None = None
        if isinstance(self.leak, dict):  # M_t -> l_t + (1 - l_t) M_t, per task
            per_task = [self.leak.get(n, 0.0) for n in names]
            leak = torch.tensor(per_task, dtype=jacobian.dtype, device=jacobian.device)
            keep = 1 - leak
            total, mass = keep @ jacobian, keep @ jacobian.abs()
            base = leak @ jacobian
        elif self.leak:
            base = self.leak * total
            total, mass = (1 - self.leak) * total, (1 - self.leak) * mass
        kept = torch.where(purity > draw, total + mass, torch.where(purity < draw, total - mass, 0.0)) / 2
        direction = kept if base is None else base + kept
        return direction, self.implied_weights(jacobian, direction)
