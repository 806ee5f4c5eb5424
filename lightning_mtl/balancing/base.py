"""The balancer interface and registry (DESIGN.md section 4).

A balancer turns the per-task losses of a step into the quantity the optimizer follows. Two families:

* ``loss`` weighting: ``losses -> one scalar``; runs under Lightning's automatic optimization, so every
  precision and strategy works unchanged. :meth:`Balancer.forward` returns the scalar and the weights.
* ``gradient`` aggregation: per-task gradients of the shared parameters -> one direction (MGDA,
  PCGrad, ...). Those set ``family = "gradient"`` and implement :meth:`Balancer.aggregate`; the module
  switches itself to manual optimization for them.

A balancer is an ``nn.Module`` so that its state (learned log-variances, loss history) lands in the
checkpoint's ``state_dict`` and a resumed run continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_mtl._registry import Registry, build_from_spec

if TYPE_CHECKING:
    from lightning_mtl.tasks import Task

BALANCER_REGISTRY: Registry[type[Balancer]] = Registry("balancer")


@dataclass
class Balanced:
    """What a loss-weighting balancer returns: the ``loss`` to back-propagate and the ``weights``
    it gave each task (logged as ``weights/<task>``)."""

    loss: Tensor
    weights: dict[str, Tensor]


class Balancer(nn.Module):
    """Base class of all balancers.

    Class attributes declare behaviour: ``family`` (``"loss"`` or ``"gradient"``) and
    ``uses_task_weights`` (whether ``Task.weight`` means something to this method; if not, a task
    with a non-default weight is an error rather than a silently ignored setting).
    """

    family: ClassVar[str] = "loss"
    uses_task_weights: ClassVar[bool] = False
    registry_name: ClassVar[str] = ""

    def __init__(self) -> None:
        super().__init__()
        self.task_names: list[str] = []

    def setup(self, tasks: Sequence[Task]) -> None:
        """Called once by the module with its tasks, before training."""
        self.task_names = [t.name for t in tasks]
        if not self.uses_task_weights:
            weighted = {t.name: t.weight for t in tasks if t.weight != 1.0}
            if weighted:
                raise ValueError(
                    f"Balancer {self.registry_name!r} does not use Task.weight, but tasks {weighted} set one. "
                    "Use balancer='static' for fixed weights, or remove the weights."
                )

    def forward(self, losses: Mapping[str, Tensor]) -> Balanced:
        """Combine the losses of the tasks present in this step (absent tasks are simply missing)."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """JSON-able constructor arguments, so ``{"class_path", "init_args"}`` rebuilds this balancer."""
        return {}

    def spec(self) -> dict[str, Any]:
        return {
            "class_path": f"{type(self).__module__}.{type(self).__qualname__}",
            "init_args": self.config(),
        }

    @staticmethod
    def weighted_sum(losses: Mapping[str, Tensor], weights: Mapping[str, float | Tensor]) -> Balanced:
        """``sum_t w_t * L_t`` over the tasks present, with the weights as tensors for logging."""
        first = next(iter(losses.values()))
        out = {k: torch.as_tensor(weights[k], dtype=torch.float32, device=first.device) for k in losses}
        total = sum(out[k] * v for k, v in losses.items())
        return Balanced(loss=total if isinstance(total, Tensor) else first * 0, weights=out)


def register_balancer(name: str) -> Callable[[type[Balancer]], type[Balancer]]:
    """Register a :class:`Balancer` subclass under ``name``; a taken name raises ``ValueError``.

    Example:
        >>> @register_balancer("doc_example_max")
        ... class MaxLoss(Balancer):
        ...     def forward(self, losses):
        ...         worst = max(losses, key=lambda k: float(losses[k]))
        ...         return self.weighted_sum(losses, {k: float(k == worst) for k in losses})
        >>> "doc_example_max" in list_balancers()
        True
    """
    return BALANCER_REGISTRY.register(name)


def list_balancers(filter: str | None = None) -> list[str]:
    """Registered balancer names, optionally filtered with an fnmatch pattern.

    Example:
        >>> list_balancers("e*")
        ['equal']
    """
    return BALANCER_REGISTRY.list(filter)


def create_balancer(balancer: str | Mapping[str, Any] | Balancer | None) -> Balancer:
    """Build a balancer from a registered name, a ``{"class_path", "init_args"}`` spec or an instance.

    Example:
        >>> create_balancer("static")
        StaticWeighting()
    """
    if balancer is None:
        balancer = "static"
    if isinstance(balancer, Balancer):
        return balancer
    if isinstance(balancer, str):
        return BALANCER_REGISTRY.get(balancer)()
    if isinstance(balancer, Mapping) and "name" in balancer:
        kwargs = {k: v for k, v in balancer.items() if k != "name"}
        return BALANCER_REGISTRY.get(balancer["name"])(**kwargs)
    built = build_from_spec(dict(balancer), "balancer")
    if not isinstance(built, Balancer):
        raise TypeError(f"balancer spec built {type(built).__name__}, which is not a lightning_mtl Balancer.")
    return built
