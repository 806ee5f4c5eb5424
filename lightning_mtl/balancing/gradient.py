"""Gradient aggregation: the base class of MGDA, PCGrad, CAGrad... and the per-task Jacobian step.

Almost every aggregator returns a linear combination ``d = w @ J`` of the task gradients (the rows of
the Jacobian ``J``), with weights ``w`` that depend only on the Gram matrix ``G = J @ J.T``. Those
methods implement :meth:`GradientBalancer.weights_from_gram` on a tiny ``T x T`` matrix and never see
the ``T x P`` Jacobian; the rest (GradDrop, DB-MTL) override :meth:`GradientBalancer.aggregate`. Both
take every task (zero rows for those without a loss) and a boolean ``present`` mask on the device, so
the step never reads back which tasks are present.

How a step runs (:meth:`GradientBalancer.forward`, the module's one balancer call; the machinery is
:func:`lightning_mtl.balancing.jacobian.jacobian_step`):

* ``mode="params"``: one ``torch.autograd.grad`` per task through the backbone (or one batched call
  with ``jacobian="batched"``) gives the rows of ``J`` over the trainable shared parameters, and each
  head's own gradient on the way. ``d`` and the head gradients become the gradient of a *surrogate*
  loss ``sum_p <p, g_p>`` (coefficients detached), which the module returns to Lightning: its backward
  is trivial, and because it is an ordinary loss, AMP loss scaling, gradient clipping, gradient
  accumulation (one aggregation per micro-batch) and DDP's gradient all-reduce work unchanged.
* ``mode="features"`` (MGDA-UB style, cheaper): the Jacobian is taken w.r.t. the shared representation
  the heads read, through the heads only; the surrogate ``sum_t L_t + <z, d_z - sum_t g_z>`` gives each
  head its own gradient and sends exactly ``d_z`` into one ordinary backbone backward.

Nothing shared trains (a frozen backbone, e.g. after ``add_task(..., freeze=True)``): there is no shared
gradient, hence no conflict to resolve. Seen from the ``requires_grad`` flags (no host read), the step is then
the plain ``sum_t L_t``: each head gets its own task's gradient, as in every step, and every present task is
logged with weight 1. A partially frozen backbone keeps the Jacobian over its trainable parameters.

Distributed (DDP): ``torch.autograd.grad`` bypasses DDP's reducer, so the step reduces explicitly and
every rank aggregates the same numbers. With ``mode="params"`` the Jacobian is averaged over ranks
(one all-reduce of ``T x P`` floats): every rank computes the aggregate of the *global* per-task
gradients, the same direction as single-process training on the global batch. With
``mode="features"`` the Gram matrix is summed over ranks (each rank holds different examples, so the
global Gram is the sum of the local ones, divided by ``world_size**2``): the weights are global and
exact, and DDP's usual reduction of the backbone backward completes the global direction. A task
absent from some ranks contributes zero rows there, exactly like its zero loss would under DDP.

Mixed precision: each per-task loss is multiplied by the AMP loss scale before its backward (so fp16
gradients do not underflow) and the Jacobian is divided by it in float32 before any method sees it;
the aggregation itself runs in float64 on the ``T x T`` Gram matrix. Non-finite gradients propagate
into the surrogate, so the GradScaler skips that step as it would any overflow.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import Tensor

from lightning_mtl.balancing.base import Balanced, Balancer, StepContext, TaskLosses, is_distributed
from lightning_mtl.balancing.jacobian import jacobian_step, reuse_step

MODES = ("params", "features")
JACOBIANS = ("loop", "batched")


class GradientBalancer(Balancer):
    """Base class of gradient-aggregation methods.

    Args:
        mode: ``"params"`` (exact per-task gradients of the shared parameters) or ``"features"``
            (gradients w.r.t. the shared representation: one backbone backward for all tasks).
        update_every: recompute the weights every N steps and reuse them in between (a weighted loss,
            one ordinary backward); only for methods whose result is a linear combination.
        jacobian: ``"loop"`` (one ``autograd.grad`` per task, the fastest on CPU) or ``"batched"``
            (one ``autograd.grad(..., is_grads_batched=True)`` call through ``vmap``).
        memory_budget_mb: warn once when the ``T x P`` Jacobian would exceed this many MiB.
        seed: seeds the method's random choices (identical on every rank, restored on resume).

    The step options are keyword arguments handled here once: a method's constructor takes its own
    hyper-parameters and passes ``**options`` on (``default_mode`` declares a method's default ``mode``).

    Subclasses implement :meth:`weights_from_gram` (``linear = True``) or override :meth:`aggregate`. Both
    see every task of ``task_names`` (a zero Jacobian row, or Gram row and column, for a task without a loss
    in the step) and a bool ``present`` mask on the device, so that no step reads which tasks are present
    back to the host.

    ``update_every``: the steps in between reuse the last finite weights (an overflowed step, whose weights
    are NaN, keeps the previous ones); a task present on such a step but absent when the weights were
    computed gets the mean of the cached weights of the tasks that were present then (1 before any weights
    were computed). Which steps recompute depends on the step counter only, not on the tasks present.
    """

    family: ClassVar[str] = "gradient"
    linear: ClassVar[bool] = True
    supports_features: ClassVar[bool] = True
    default_mode: ClassVar[str] = "params"
    cached_weights: Tensor
    cached_mask: Tensor

    def __init__(
        self,
        *,
        mode: str | None = None,
        update_every: int = 1,
        jacobian: str = "loop",
        memory_budget_mb: float = 2048.0,
        seed: int = 0,
    ) -> None:
        super().__init__(seed=seed)
        mode = self.default_mode if mode is None else mode
        if mode not in MODES:
            raise ValueError(f"{type(self).__name__}: mode must be one of {MODES}, got {mode!r}.")
        if mode == "features" and not self.supports_features:
            raise ValueError(
                f"{type(self).__name__} needs parameter gradients; mode='features' is not supported."
            )
        if jacobian not in JACOBIANS:
            raise ValueError(f"{type(self).__name__}: jacobian must be one of {JACOBIANS}, got {jacobian!r}.")
        if int(update_every) < 1:
            raise ValueError(f"{type(self).__name__}: update_every must be >= 1, got {update_every}.")
        if int(update_every) > 1 and not self.linear:
            raise ValueError(
                f"{type(self).__name__} does not return a linear combination of task gradients, so its weights "
                "cannot be reused: update_every must be 1."
            )
        self.mode = mode
        self.update_every = int(update_every)
        self.jacobian = jacobian
        self.memory_budget_mb = float(memory_budget_mb)
        self._warned_memory = False
        self._workspace: Tensor | None = None

    def setup(self, tasks: Sequence[object]) -> None:  # type: ignore[override]
        super().setup(tasks)  # type: ignore[arg-type]
        n = len(self.task_names)
        # The last computed weights (for update_every), with the mask of the tasks they were computed for.
        self.register_buffer("cached_weights", torch.zeros(n))
        self.register_buffer("cached_mask", torch.zeros(n, dtype=torch.bool))

    # --- what subclasses implement -------------------------------------------------------------------
    def weights_from_gram(self, gram: Tensor, present: Tensor | None = None) -> Tensor:
        """Weights ``w`` (length T, float64) of the direction ``w @ J`` for the Gram matrix ``G = J J^T``.

        ``gram``: ``T x T`` (float64) over every task of ``task_names``, in order; ``present``: bool ``[T]`` on
        ``gram``'s device, the tasks with a loss in this step (``None``: all). An absent task's row and column
        of ``G`` are zero. Implementations return exactly 0 for the absent tasks and, for the others, the
        method applied to ``G`` restricted to the present tasks (zeros if none is present), with a fixed
        amount of work and without reading any value back to the host.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement weights_from_gram or aggregate.")

    def aggregate(self, jacobian: Tensor, present: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The update direction (length P) and the per-task weights (length T) for ``jacobian`` (T x P).

        ``jacobian`` has a row per task of ``task_names`` (zero for the tasks absent from the step); ``present``
        as in :meth:`weights_from_gram`. The default computes the Gram matrix and calls
        :meth:`weights_from_gram`.
        """
        gram = (jacobian @ jacobian.T).double()
        weights = self.weights_from_gram(gram, present).to(jacobian.dtype)
        return weights @ jacobian, weights

    def prepare_losses(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Transform the task losses before their gradients are taken (DB-MTL uses ``log``). Default: none."""
        return dict(losses)

    def forward(self, losses: TaskLosses, context: StepContext | None = None) -> Balanced:
        """One Jacobian step: per-task gradients (of the shared parameters or features), the method's
        aggregation, and a surrogate loss whose gradient is the aggregated direction (module docstring)."""
        if context is None:
            raise ValueError(
                f"{type(self).__name__} aggregates per-task gradients and needs the step's StepContext (backbone, "
                "features, loss scale, task parameters); MultiTaskModule passes one."
            )
        names = list(losses.task_names)
        present = losses.present
        if is_distributed():  # present on any rank: an all-reduce on the device, no host read
            anywhere = present.float()
            torch.distributed.all_reduce(anywhere)
            present = anywhere > 0
        prepared = self.prepare_losses(losses)
        objective = losses.vector.detach().sum()
        inputs = self.shared_inputs(context)
        if not inputs:  # nothing shared trains (a frozen backbone): no conflict to resolve
            return Balanced.of(losses, self.plain_loss(prepared), present.float(), objective)
        scale = context.loss_scale if context.amp_scaled else None  # skips two T x P passes without AMP
        own = {n: [p for p in context.task_parameters.get(n, ()) if p.requires_grad] for n in prepared}

        cached = self.reusable_weights(present) if self.linear else None
        if cached is not None:  # update_every: one ordinary backward with the last weights
            reused = {n: cached[names.index(n)] for n in prepared}
            surrogate = reuse_step(prepared, reused, own, scale)
            return Balanced.of(losses, surrogate, cached, objective)

        world = torch.distributed.get_world_size() if is_distributed() else 1
        if self.mode == "params":
            reduce = _average_over_ranks if world > 1 else None
            gram_world = 1  # the Jacobian itself is averaged over the ranks
        else:
            reduce, gram_world = None, world  # each rank's rows hold its own examples: sum the Grams
        cols = sum(t.numel() for t in inputs)
        self.check_memory(len(names), cols)
        surrogate, weights = jacobian_step(
            prepared,
            names,
            inputs,
            own,
            lambda jac: self.combine(jac, present, gram_world),
            self.workspace(len(names), cols, inputs[0].device),
            scale=scale,
            batched=self.jacobian == "batched",
            retain_graph=context.retain_graph,
            reduce=reduce,
        )
        self.remember(present, weights)
        return Balanced.of(losses, surrogate, weights.detach(), objective)

    def shared_inputs(self, context: StepContext) -> list[Tensor]:
        """The tensors the per-task gradients are taken for: the trainable backbone parameters
        (``mode="params"``) or the shared features that require grad (``mode="features"``). Decided from the
        ``requires_grad`` flags (host metadata): empty when the backbone is frozen."""
        if self.mode == "params":
            return list(context.shared_parameters())
        return list({id(f): f for f in context.features if f.requires_grad}.values())

    @staticmethod
    def plain_loss(losses: Mapping[str, Tensor]) -> Tensor:
        """The step when nothing shared trains (a frozen backbone): ``sum_t L_t``, whose one ordinary backward
        gives each head its own task's gradient, as every Jacobian step does (``losses`` are the method's
        :meth:`prepare_losses`; DB-MTL's heads get the gradient of ``log L_t``). With no shared gradient
        there is no conflict to resolve: every present task weighs 1.

        Example:
            >>> head = torch.tensor(2.0, requires_grad=True)
            >>> GradientBalancer.plain_loss({"a": 3 * head, "b": head.detach()}).backward()
            >>> head.grad
            tensor(3.)
        """
        first = next(iter(losses.values()))
        return sum(losses.values(), first.new_zeros(()))

    def combine(self, jacobian: Tensor, present: Tensor, world: int = 1) -> tuple[Tensor, Tensor]:
        """The direction and the weights for ``jacobian`` (a row per task). For a linear method the weights
        come from the Gram matrix (``world > 1``: the sum of the ranks' local Grams, each rank's rows holding
        its own examples), and a single present task gets weight 1: its plain gradient."""
        if not self.linear:
            return self.aggregate(jacobian, present)
        if jacobian.shape[0] == 1:
            return jacobian[0].clone(), jacobian.new_ones(
                1
            )  # not a view of the workspace (rewritten next step)
        gram = (jacobian @ jacobian.T).double()
        if world > 1:
            torch.distributed.all_reduce(gram)
            gram.div_(world**2)
        w = self.weights_from_gram(gram, present).to(jacobian.dtype)
        w = torch.where(present.sum() == 1, present.to(w.dtype), w)
        return w @ jacobian, w

    # --- helpers ---------------------------------------------------------------------------------------
    @staticmethod
    def implied_weights(jacobian: Tensor, direction: Tensor) -> Tensor:
        """For a non-linear method: ``<d, g_t> / |g_t|^2``, the share of each task gradient in ``d``."""
        norms = torch.linalg.vector_norm(jacobian, dim=1).square()  # no T x P temporary
        return (jacobian @ direction) / norms.clamp_min(torch.finfo(norms.dtype).tiny)

    def reusable_weights(self, present: Tensor) -> Tensor | None:
        """The cached weights (length T) when this step may reuse them (``update_every``), else ``None``.

        Decided from the host step counter alone. A task present now but absent when the weights were
        computed gets the mean of the cached weights of the tasks that were present then (1 if there are none:
        the first computation overflowed).
        """
        if self.update_every <= 1 or self.step_count % self.update_every == 0:
            return None
        known = self.cached_mask.to(present.device)
        cached = self.cached_weights.to(present.device)
        mean = (cached * known).sum() / known.sum().clamp_min(1)
        fallback = torch.where(known.any(), mean, 1.0)
        return torch.where(known, cached, fallback)

    def remember(self, present: Tensor, weights: Tensor) -> None:
        """Cache ``weights`` (length T) for ``update_every``; non-finite weights (an overflowed step, which the
        GradScaler skips) leave the previous cache in place."""
        if self.update_every <= 1:
            return
        finite = torch.isfinite(weights).all()
        w = weights.detach().to(self.cached_weights)
        self.cached_weights.copy_(torch.where(finite, w, self.cached_weights))
        self.cached_mask.copy_(torch.where(finite, present.to(self.cached_mask.device), self.cached_mask))

    def workspace(self, rows: int, cols: int, device: torch.device) -> Tensor:
        """The ``rows x cols`` float32 matrix the per-task gradients are written into, kept between steps.

        Reusing it is what a GPU caching allocator does anyway; on CPU it saves mapping and page-faulting a
        fresh matrix every step (it is larger than malloc reuses from its heap). Not part of the state dict.
        """
        ws = self._workspace
        if ws is None or ws.shape != (rows, cols) or ws.device != device:
            self._workspace = None  # free the old one first
            ws = self._workspace = torch.empty(rows, cols, device=device, dtype=torch.float32)
        return ws

    def check_memory(self, rows: int, cols: int) -> None:
        mib = rows * cols * 4 / 2**20
        if mib > self.memory_budget_mb and not self._warned_memory:
            self._warned_memory = True
            hint = (
                "Use mode='features' (gradients of the shared representation) or update_every=N"
                if self.mode == "params"
                else "Use update_every=N or a smaller batch"
            )
            warnings.warn(
                f"{type(self).__name__}: the {rows} x {cols} per-task gradient matrix takes {mib:.0f} MiB, over "
                f"memory_budget_mb={self.memory_budget_mb:.0f}. {hint}.",
                stacklevel=2,
            )


def _average_over_ranks(jacobian: Tensor) -> Tensor:
    """The Jacobian averaged over the DDP ranks, in place (one all-reduce of ``T x P`` floats)."""
    torch.distributed.all_reduce(jacobian)
    return jacobian.div_(torch.distributed.get_world_size())
