"""``gradnorm``: Gradient Normalization (Chen et al., 2018)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from lightning_mtl.balancing.base import Balanced, Balancer, StepContext, TaskLosses, register_balancer

if TYPE_CHECKING:
    from lightning_mtl.tasks import Task


@register_balancer("gradnorm")
class GradNorm(Balancer):
    """Chen, Badrinarayanan, Lee & Rabinovich (2018), "GradNorm: Gradient Normalization for Adaptive Loss
    Balancing in Deep Multitask Networks" (ICML).

    Learned weights ``w`` (an ``nn.Parameter`` the module's optimizer trains at ``head_lr``) pull each task's
    weighted gradient norm ``w_t G_t`` towards ``mean(w G) * r_t^alpha``, where ``r_t`` is the task's loss
    ratio ``L_t / L_t(0)`` relative to the mean ratio: tasks that train slowly get larger gradients.

    Args:
        alpha: strength of the pull towards equal training rates (paper: 1.5; 0 equalises gradient norms).
        layer: where the gradient norms ``G_t`` are measured. ``None``: the shared representation the heads
            read (cheap: the backward stops at the features). A string: the backbone parameters whose
            names start with it, e.g. the last shared layer as in the paper (``"net.3"``).

    ``loss = sum_t w_t.detach() L_t + sum_t |w_t G_t - target_t|``: the second term trains only ``w``. At the
    start of every step ``w`` is renormalised to sum to ``K`` (floored at ``weight_floor``). ``G_t`` and
    ``L_t`` are averaged over the DDP ranks; ``L_t(0)`` is the first value seen for each task (a task whose
    ``L_t(0) <= 0`` keeps ratio 1).

    Example:
        >>> import torch
        >>> from lightning_mtl import Task
        >>> from lightning_mtl.balancing.base import StepContext
        >>> net = torch.nn.Linear(3, 2)
        >>> feats = net(torch.ones(4, 3))
        >>> losses = {"a": feats[:, 0].pow(2).mean(), "b": feats[:, 1].abs().mean()}
        >>> b = GradNorm()
        >>> b.setup([Task("a", kind="regression"), Task("b", kind="regression")])
        >>> out = b(losses, StepContext(features=[feats], backbone=net, loss_scale=torch.ones(())))
        >>> out.weights
        {'a': tensor(1.), 'b': tensor(1.)}
    """

    weight_floor: ClassVar[float] = 1e-3
    needs_shared_gradients: ClassVar[bool] = True

    initial_losses: Tensor
    seen: Tensor

    def __init__(self, alpha: float = 1.5, layer: str | None = None) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self.layer = layer
        self.weights = nn.Parameter(torch.ones(0))

    def setup(self, tasks: Sequence[Task]) -> None:
        super().setup(tasks)
        n, device = len(self.task_names), self.calls.device
        self.weights = nn.Parameter(torch.ones(n, device=device))
        self.register_buffer("initial_losses", torch.zeros(n, device=device))
        self.register_buffer("seen", torch.zeros(n, dtype=torch.bool, device=device))

    def _inputs(self, context: StepContext) -> list[Tensor]:
        """The tensors whose gradient norms are measured: the features or the ``layer`` parameters."""
        if self.layer is None:
            feats = list({id(f): f for f in context.features if f.requires_grad}.values())
            if not feats:
                raise ValueError(
                    "GradNorm(layer=None) measures gradient norms at the shared features, but none requires grad "
                    "(is the backbone frozen?). Pass layer='<parameter-name prefix>' or unfreeze the backbone."
                )
            return feats
        named = list(context.backbone.named_parameters())
        params: list[Tensor] = [p for name, p in named if name.startswith(self.layer) and p.requires_grad]
        if not params:
            names = [name for name, p in named if p.requires_grad]
            raise ValueError(
                f"GradNorm(layer={self.layer!r}): no trainable backbone parameter name starts with {self.layer!r}. "
                f"Trainable parameters include {names[-8:]} ({len(names)} in all); pass one of their prefixes."
            )
        return params

    def forward(self, losses: TaskLosses, context: StepContext | None = None) -> Balanced:
        if context is None:
            raise ValueError(
                "GradNorm needs a StepContext (features, backbone, loss scale) to measure gradient norms; "
                "MultiTaskModule passes one. Call it as balancer(losses, StepContext(...))."
            )
        k = len(self.task_names)
        with torch.no_grad():
            # Renormalise through .data: under FSDP the parameter is a view of a flat parameter, which
            # autograd forbids modifying in place.
            floored = self.weights.data.float().clamp_min(self.weight_floor)
            self.weights.data.copy_(floored * (k / floored.sum()))

        inputs, scale = self._inputs(context), context.loss_scale
        norms: dict[str, Tensor] = {}
        for name, loss in losses.items():
            grads = torch.autograd.grad(loss * scale, inputs, retain_graph=True, allow_unused=True)
            squares = [(g.float() / scale).pow(2).sum() for g in grads if g is not None]
            norms[name] = torch.stack(squares).sum().sqrt() if squares else scale.new_zeros(())
        present = losses.present
        norm_vector = TaskLosses(norms, losses.task_names).vector
        grad_norm, present = self.reduce_per_task(norm_vector, present)  # collectives: every rank, every step
        loss_mean, _ = self.reduce_per_task(losses.vector.detach(), losses.present)
        device = self.weights.device
        grad_norm, present, loss_mean = grad_norm.to(device), present.to(device), loss_mean.to(device)

        new = present & ~self.seen
        self.initial_losses.copy_(torch.where(new, loss_mean, self.initial_losses))
        self.seen.logical_or_(present)
        valid = present & (self.initial_losses > 0)
        ratio = torch.where(
            valid, loss_mean / torch.where(valid, self.initial_losses, torch.ones_like(loss_mean)), 1.0
        )
        count = present.sum().clamp_min(1)
        ratio = torch.where(present, ratio, 0.0)
        relative = ratio / (ratio.sum() / count)

        weighted = self.weights * grad_norm
        mean_norm = torch.where(present, weighted, 0.0).sum().detach() / count
        target = (mean_norm * relative.pow(self.alpha)).detach()
        grad_loss = torch.where(present, (weighted - target).abs(), 0.0).sum()

        w = self.weights.to(losses.vector.device).float()
        total = (w.detach() * losses.vector).sum() + grad_loss.to(losses.vector.device)
        return Balanced.of(losses, total, w.detach() * losses.present)
