"""The balancer interface and registry (DESIGN.md section 4).

A balancer turns the per-task losses of a step into the quantity the optimizer follows. Two families:

* ``loss`` weighting: ``losses -> one scalar``; runs under Lightning's automatic optimization, so every
  precision and strategy works unchanged. :meth:`Balancer.forward` returns the scalar and the weights.
* ``gradient`` aggregation: per-task gradients of the shared parameters (or of the shared
  representation) -> one update direction (MGDA, PCGrad, ...). Those subclass
  :class:`~lightning_mtl.balancing.gradient.GradientBalancer`. The module still runs under Lightning's
  *automatic* optimization: it returns a surrogate loss whose gradient is exactly the aggregated
  direction, so gradient clipping, accumulation, AMP loss scaling and DDP reduction all keep working.

Hooks a balancer may implement besides :meth:`Balancer.forward`: :meth:`Balancer.on_train_epoch_end`
(epoch-level statistics, e.g. DWA) and :meth:`Balancer.after_step` (losses re-computed on the same batch
after the optimizer step, e.g. FAMO; set ``needs_post_step_losses = True``).

Distributed training: every rank must take the same decision. Balancers reduce what they use across
ranks with :meth:`Balancer.reduce_per_task`, which averages per-task values over the ranks where the
task is present (a task may be absent from some ranks' batches), and draw random numbers from
:meth:`Balancer.generator`, which is seeded identically on every rank from a step counter kept in the
state dict (so a resumed run draws the same numbers as an uninterrupted one).

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
class StepContext:
    """What the module tells a balancer about the current training step, beyond the losses.

    ``features``: the shared representation tensors the heads read (in the autograd graph);
    ``backbone``: the shared network (its trainable parameters are the shared parameters);
    ``loss_scale``: the AMP loss scale as a tensor (``1.0`` without a ``GradScaler``), by which a balancer
    multiplies a loss before its own ``torch.autograd.grad`` call and divides the result, so fp16
    gradients do not underflow and no absolute epsilon ever sees scaled values.
    """

    features: list[Tensor]
    backbone: nn.Module
    loss_scale: Tensor
    amp_scaled: bool = False  # whether a GradScaler is active (``loss_scale`` may then differ from 1)

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.backbone.parameters() if p.requires_grad]


@dataclass
class Balanced:
    """What a loss-weighting balancer returns: the ``loss`` to back-propagate and the ``weights``
    it gave each task (logged as ``weights/<task>``)."""

    loss: Tensor
    weights: dict[str, Tensor]


class Balancer(nn.Module):
    """Base class of all balancers.

    Class attributes declare behaviour: ``family`` (``"loss"`` or ``"gradient"``),
    ``uses_task_weights`` (whether ``Task.weight`` means something to this method; if not, a task
    with a non-default weight is an error rather than a silently ignored setting),
    ``needs_post_step_losses`` (call :meth:`after_step`) and ``stateful`` (keep the step counter in
    the state dict; stateless methods such as ``static`` save nothing).

    Per-task state belongs in buffers or parameters created in :meth:`setup`, so it is checkpointed.
    """

    family: ClassVar[str] = "loss"
    uses_task_weights: ClassVar[bool] = False
    needs_post_step_losses: ClassVar[bool] = False
    stateful: ClassVar[bool] = True
    registry_name: ClassVar[str] = ""
    calls: Tensor

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.task_names: list[str] = []
        self.seed = int(seed)
        # Training steps so far (counted by __call__): seeds generator(), drives update_every, and is saved in
        # the checkpoint unless the class declares itself stateless. ``_steps`` mirrors it on the host so that
        # reading it never waits for the device; a loaded state dict refreshes the mirror once.
        self.register_buffer("calls", torch.zeros((), dtype=torch.long), persistent=self.stateful)
        self._steps: int | None = 0

    def setup(self, tasks: Sequence[Task]) -> None:
        """Called by the module with its tasks, before training (and again when tasks change).
        Subclasses create their per-task state here, indexed like ``self.task_names``."""
        self.task_names = [t.name for t in tasks]
        if not self.uses_task_weights:
            weighted = {t.name: t.weight for t in tasks if t.weight != 1.0}
            if weighted:
                raise ValueError(
                    f"Balancer {self.registry_name!r} does not use Task.weight, but tasks {weighted} set one. "
                    "Use balancer='static' for fixed weights, or remove the weights."
                )

    def forward(self, losses: Mapping[str, Tensor], context: StepContext | None = None) -> Balanced:
        """Combine the losses of the tasks present in this step (absent tasks are simply missing)."""
        raise NotImplementedError

    def on_train_epoch_end(self) -> None:
        """Called by the module at the end of every training epoch (on every rank)."""

    def after_step(self, before: Mapping[str, Tensor], after: Mapping[str, Tensor]) -> None:
        """Called after each optimizer step when ``needs_post_step_losses``: the losses of the same batch
        before and after the update (detached)."""

    # --- helpers for subclasses ---------------------------------------------------------------------
    def index(self, names: Sequence[str] | Mapping[str, Any]) -> Tensor:
        """Positions of ``names`` in ``self.task_names`` (as a long tensor on the balancer's device)."""
        return torch.tensor(
            [self.task_names.index(n) for n in names], dtype=torch.long, device=self.calls.device
        )

    def stack(self, values: Mapping[str, Tensor]) -> Tensor:
        """``values`` (a subset of the tasks) as a float tensor of length ``len(task_names)``, zeros elsewhere."""
        first = next(iter(values.values()))
        out = torch.zeros(len(self.task_names), dtype=torch.float32, device=first.device)
        for name, v in values.items():
            out[self.task_names.index(name)] = v.detach().float()
        return out

    def reduce_per_task(self, values: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Average per-task scalars over the DDP ranks where each task is present.

        Returns ``(mean, present)``: two tensors of length ``len(task_names)``; ``present`` is a bool mask
        of the tasks present on at least one rank, ``mean`` is 0 elsewhere. Without a process group this
        is :meth:`stack` and the local presence mask. A collective: call it on every rank, every step.
        """
        stacked = self.stack(values)
        count = torch.zeros_like(stacked)
        count[[self.task_names.index(n) for n in values]] = 1.0
        if is_distributed():
            both = torch.stack([stacked, count])
            torch.distributed.all_reduce(both)
            stacked, count = both[0], both[1]
        present = count > 0
        return torch.where(present, stacked / count.clamp_min(1.0), torch.zeros_like(stacked)), present

    @property
    def step_count(self) -> int:
        """The step counter ``calls`` as a host integer, read without a device synchronisation (after a
        checkpoint load, once)."""
        if self._steps is None:
            self._steps = int(self.calls)
        return self._steps

    def set_step_count(self, value: int) -> None:
        """Set the step counter (``calls`` and its host mirror), e.g. to replay a given step in a test."""
        self.calls.fill_(int(value))
        self._steps = int(value)

    def count_step(self) -> None:
        """Advance the step counter by one (the module calls it once per training step)."""
        self.calls.add_(1)
        self._steps = self.step_count + 1

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[arg-type]
        self._steps = None  # read the loaded counter once, when next needed

    def generator(self, device: torch.device | str | None = None) -> torch.Generator:
        """A generator seeded from ``(seed, step_count)``: the same numbers on every rank and after a resume,
        without reading the device."""
        device = torch.device(device) if device is not None else self.calls.device
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed * 1_000_003 + self.step_count)
        return gen

    def config(self) -> dict[str, Any]:
        """JSON-able constructor arguments, so ``{"class_path", "init_args"}`` rebuilds this balancer.
        The default reads the constructor's parameter names back from same-named attributes."""
        import inspect

        out: dict[str, Any] = {}
        for name in inspect.signature(type(self).__init__).parameters:
            if name != "self" and hasattr(self, name):
                value = getattr(self, name)
                out[name] = list(value) if isinstance(value, tuple) else value
        return out

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


def is_distributed() -> bool:
    """Whether a default process group with more than one rank is running."""
    return bool(
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def register_balancer(name: str) -> Callable[[type[Balancer]], type[Balancer]]:
    """Register a :class:`Balancer` subclass under ``name``; a taken name raises ``ValueError``.

    Example:
        >>> @register_balancer("doc_example_max")
        ... class MaxLoss(Balancer):
        ...     def forward(self, losses, context=None):
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
