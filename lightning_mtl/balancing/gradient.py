"""Gradient aggregation: the base class of MGDA, PCGrad, CAGrad... and the per-task Jacobian step.

Almost every aggregator returns a linear combination ``d = w @ J`` of the task gradients (the rows of
the Jacobian ``J``), with weights ``w`` that depend only on the Gram matrix ``G = J @ J.T``. Those
methods implement :meth:`GradientBalancer.weights_from_gram` on a tiny ``T x T`` matrix and never see
the ``T x P`` Jacobian; the rest (GradDrop, DB-MTL) override :meth:`GradientBalancer.aggregate`. Both
take every task (zero rows for those without a loss) and a boolean ``present`` mask on the device, so
the step never reads back which tasks are present.

How a step runs (:func:`jacobian_step`, called by :class:`~lightning_mtl.MultiTaskModule`):

* ``mode="params"``: one ``torch.autograd.grad`` per task through the backbone (or one batched call
  with ``jacobian="batched"``) gives the rows of ``J`` over the trainable shared parameters, and each
  head's own gradient on the way. ``d`` and the head gradients become the gradient of a *surrogate*
  loss ``sum_p <p, g_p>`` (coefficients detached), which the module returns to Lightning: its backward
  is trivial, and because it is an ordinary loss, AMP loss scaling, gradient clipping, gradient
  accumulation (one aggregation per micro-batch) and DDP's gradient all-reduce work unchanged.
* ``mode="features"`` (MGDA-UB style, cheaper): the Jacobian is taken w.r.t. the shared representation
  the heads read, through the heads only; the surrogate ``sum_t L_t + <z, d_z - sum_t g_z>`` gives each
  head its own gradient and sends exactly ``d_z`` into one ordinary backbone backward.

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
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from lightning_mtl.balancing.base import Balanced, Balancer, StepContext, is_distributed

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
    cached_weights: Tensor
    cached_mask: Tensor

    def __init__(
        self,
        mode: str = "params",
        update_every: int = 1,
        jacobian: str = "loop",
        memory_budget_mb: float = 2048.0,
        seed: int = 0,
    ) -> None:
        super().__init__(seed=seed)
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

    def forward(self, losses: Mapping[str, Tensor], context: StepContext | None = None) -> Balanced:
        """Run the Jacobian step: per-task gradients, aggregation, and a surrogate loss whose gradient is the
        aggregated direction (see the module docstring)."""
        if context is None:
            raise ValueError(
                f"{type(self).__name__} aggregates per-task gradients and needs the step's StepContext (backbone, "
                "features, loss scale, task parameters); MultiTaskModule passes one."
            )
        out = jacobian_step(self, losses, context, context.task_parameters, retain_graph=context.retain_graph)
        objective = torch.stack([v.detach().float() for v in losses.values()]).sum()
        return Balanced(out.loss, out.weights, task_names=self.task_names, objective=objective)

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


def _presence(balancer: Balancer, losses: Mapping[str, Tensor], device: torch.device) -> Tensor:
    """Bool ``[T]`` on ``device``: the tasks of ``balancer.task_names`` with a loss on this rank, or under DDP
    on any rank (an all-reduce of floats, compared on the device: no host read)."""
    local = torch.tensor([n in losses for n in balancer.task_names], dtype=torch.float32)
    local = local.to(device, non_blocking=True)  # from the host without a stream synchronisation
    if is_distributed():
        torch.distributed.all_reduce(local)
    return local > 0


def _task_jacobian(
    losses: Mapping[str, Tensor],
    names: Sequence[str],
    inputs: Sequence[Tensor],
    task_inputs: Mapping[str, Sequence[Tensor]],
    scale: Tensor | None,
    batched: bool,
    retain_last: bool,
    jac: Tensor,
) -> tuple[Tensor, dict[str, tuple[Tensor | None, ...]]]:
    """Rows of ``d L_t / d inputs`` (flattened; zero rows for tasks absent locally), divided by ``scale``,
    written into ``jac`` (``len(names) x total size``), and each task's own gradients of
    ``task_inputs[t]`` (its head) on the way."""
    sizes = [t.numel() for t in inputs]
    device = inputs[0].device
    own: dict[str, tuple[Tensor | None, ...]] = {}
    local = [n for n in names if n in losses]
    for i, name in enumerate(names):
        if name not in losses:  # absent on this rank (present on another): a zero row
            jac[i].zero_()

    def scaled(loss: Tensor) -> Tensor:
        return loss if scale is None else loss * scale

    if batched and local:
        extra = [p for n in local for p in task_inputs.get(n, ())]
        eye = torch.eye(len(local), device=device, dtype=losses[local[0]].dtype)
        stacked = torch.stack([scaled(losses[n]) for n in local])
        grads = torch.autograd.grad(
            stacked,
            [*inputs, *extra],
            grad_outputs=eye,
            is_grads_batched=True,
            retain_graph=retain_last,
            allow_unused=True,
        )
        rows = [names.index(n) for n in local]
        offset = 0
        for g, size in zip(grads[: len(inputs)], sizes):
            if g is not None:
                jac[rows, offset : offset + size] = g.reshape(len(local), -1).float()
            else:
                jac[rows, offset : offset + size] = 0.0
            offset += size
        start = len(inputs)
        for k, n in enumerate(local):
            count = len(task_inputs.get(n, ()))
            own[n] = tuple(None if g is None else g[k] for g in grads[start : start + count])
            start += count
    else:
        for i, name in enumerate(names):
            if name not in losses:
                continue
            extra = list(task_inputs.get(name, ()))
            last = name == local[-1]
            grads = torch.autograd.grad(
                scaled(losses[name]),
                [*inputs, *extra],
                retain_graph=retain_last or not last,
                allow_unused=True,
            )
            offset = 0
            for g, size in zip(grads[: len(inputs)], sizes):
                if g is not None:
                    jac[i, offset : offset + size] = g.reshape(-1)
                else:  # this input does not reach task i's loss
                    jac[i, offset : offset + size].zero_()
                offset += size
            own[name] = tuple(grads[len(inputs) :])
    if scale is not None:
        jac.div_(scale)
        own = {n: tuple(None if g is None else g / scale for g in gs) for n, gs in own.items()}
    return jac, own


class _FixedGradient(torch.autograd.Function):
    """A zero-valued term whose gradient with respect to each input is a fixed tensor: ``grads[k]`` times
    the incoming gradient (so loss scaling and ``1 / accumulate_grad_batches`` still apply).

    The same gradient as ``sum_k <inputs_k, grads_k>`` without computing that product: no pass over the
    parameters in the forward, one multiply per input in the backward.
    """

    @staticmethod
    def forward(ctx: Any, grads: tuple[Tensor, ...], *inputs: Tensor) -> Tensor:  # type: ignore[override]
        ctx.grads = grads
        return inputs[0].new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        grads = ctx.grads
        ctx.grads = None  # free the direction once it has been handed out
        return (None, *(g * grad_output.to(g.dtype) for g in grads))


def _linear_term(tensors: Sequence[Tensor], flat: Tensor) -> Tensor:
    """A term whose gradient with respect to ``tensors`` is ``flat`` split like them (``flat`` is detached)."""
    grads = []
    offset = 0
    for t in tensors:
        n = t.numel()
        grads.append(flat[offset : offset + n].detach().view(t.shape).to(t.dtype))
        offset += n
    return cast(Tensor, _FixedGradient.apply(tuple(grads), *tensors))


def _fixed_term(tensors: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
    """A term whose gradient with respect to ``tensors[k]`` is ``grads[k]`` (detached)."""
    return cast(Tensor, _FixedGradient.apply(tuple(g.detach() for g in grads), *tensors))


def jacobian_step(
    balancer: GradientBalancer,
    losses: Mapping[str, Tensor],
    context: StepContext,
    task_params: Mapping[str, Sequence[nn.Parameter]],
    retain_graph: bool = False,
) -> Balanced:
    """Aggregate the tasks' gradients with ``balancer``; returns the surrogate loss and the weights.

    ``losses``: the tasks with labels in this batch on this rank. ``task_params[t]``: the parameters only
    task ``t`` uses (its head). ``retain_graph``: keep the graph for further terms (extra losses).
    The Jacobian has a row for every task of ``balancer.task_names`` (zero for the tasks without a loss
    here); the methods receive the presence mask on the device. The weights returned are those of the
    tasks in ``losses``.
    """
    losses = balancer.prepare_losses(losses)
    names = balancer.task_names
    present = _presence(balancer, losses, next(iter(losses.values())).device)
    scale = context.loss_scale if context.amp_scaled else None  # skip two T x P passes without AMP
    world = torch.distributed.get_world_size() if is_distributed() else 1
    own_params = {n: [p for p in task_params.get(n, ()) if p.requires_grad] for n in losses}

    cached = balancer.reusable_weights(present) if balancer.linear else None
    if cached is not None:
        # Reuse the weights: backbone gets sum_t w_t g_t from one ordinary backward; heads keep their own
        # (unweighted) gradient through a correction term on their parameters.
        weights = {n: cached[names.index(n)] for n in losses}
        surrogate = sum((weights[n] * losses[n] for n in losses), next(iter(losses.values())).new_zeros(()))
        for n in losses:
            params = own_params[n]
            if params:
                loss = losses[n] if scale is None else losses[n] * scale
                plain = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
                used = [(p, g) for p, g in zip(params, plain) if g is not None]
                if used:
                    factor = 1 - weights[n] if scale is None else (1 - weights[n]) / scale
                    surrogate = surrogate + _fixed_term([p for p, _ in used], [g * factor for _, g in used])
        return Balanced(loss=surrogate, weights=weights)

    if balancer.mode == "params":
        shared = context.shared_parameters()
        if not shared:
            raise ValueError(
                "Gradient balancing with mode='params' needs trainable backbone parameters; all are frozen."
            )
        cols = sum(p.numel() for p in shared)
        balancer.check_memory(len(names), cols)
        jac, own = _task_jacobian(
            losses,
            names,
            shared,
            own_params,
            scale,
            balancer.jacobian == "batched",
            retain_graph,
            balancer.workspace(len(names), cols, shared[0].device),
        )
        if world > 1:
            torch.distributed.all_reduce(jac)
            jac.div_(world)
        direction, w = _aggregate(balancer, jac, present, world=1)
        surrogate = _linear_term(shared, direction)
    else:
        feats = list({id(f): f for f in context.features if f.requires_grad}.values())
        if not feats:
            raise ValueError("Gradient balancing with mode='features' needs features that require grad.")
        cols = sum(f.numel() for f in feats)
        balancer.check_memory(len(names), cols)
        workspace = balancer.workspace(len(names), cols, feats[0].device)
        # Each head's own gradient comes with its task's row, so the final backward runs through the backbone
        # only (not through every head a second time, as backpropagating the summed losses would).
        jac, own = _task_jacobian(
            losses, names, feats, own_params, scale, balancer.jacobian == "batched", retain_graph, workspace
        )
        direction, w = _aggregate(balancer, jac, present, world)
        surrogate = _linear_term(feats, direction)
    heads = [(p, hg) for n, hgs in own.items() for p, hg in zip(own_params[n], hgs) if hg is not None]
    if heads:
        surrogate = surrogate + _fixed_term([p for p, _ in heads], [hg for _, hg in heads])
    balancer.remember(present, w)
    return Balanced(loss=surrogate, weights={n: w[names.index(n)].detach() for n in losses})


def _aggregate(balancer: GradientBalancer, jac: Tensor, present: Tensor, world: int) -> tuple[Tensor, Tensor]:
    """The direction and the weights of ``balancer`` for ``jac`` (a row per task). For a linear method, the
    weights come from the Gram matrix (``world > 1``: the sum of the ranks' local Grams, each rank's ``jac``
    holding its own examples), and a single present task gets weight 1: its plain gradient."""
    if not balancer.linear:
        return balancer.aggregate(jac, present)
    if jac.shape[0] == 1:
        return jac[0].clone(), jac.new_ones(1)  # not a view of the workspace, which the next step rewrites
    gram = (jac @ jac.T).double()
    if world > 1:
        torch.distributed.all_reduce(gram)
        gram.div_(world**2)
    w = balancer.weights_from_gram(gram, present).to(jac.dtype)
    w = torch.where(present.sum() == 1, present.to(w.dtype), w)
    return w @ jac, w
