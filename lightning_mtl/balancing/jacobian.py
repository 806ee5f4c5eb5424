"""The Jacobian step: per-task gradients, one aggregation, a surrogate loss. Knows nothing of balancer classes.

A gradient method (:class:`~lightning_mtl.balancing.gradient.GradientBalancer`) calls :func:`jacobian_step`
with its own aggregation as a function ``combine(jacobian) -> (direction, weights)``:

* the rows of the ``T x P`` Jacobian are the gradients of each task's loss with respect to ``inputs``: the
  trainable shared parameters (``mode="params"``: one ``torch.autograd.grad`` per task, or one batched call
  through ``vmap``) or the shared representation the heads read (``mode="features"``); each head's own
  gradient comes with its task's row. Tasks without a loss on this rank get a zero row. The rows are written
  into a workspace the caller keeps between steps.
* the returned *surrogate* has the aggregated direction as its gradient with respect to ``inputs`` and each
  task's own gradient for its head: a custom autograd function whose forward is 0 and whose backward hands
  each tensor its slice (times the incoming gradient, so AMP loss scaling and ``1 / accumulate_grad_batches``
  still apply). Returned to Lightning as an ordinary loss, clipping, accumulation and DDP keep working.

Nothing here reads a value back from the device: which tasks have a loss is host structure (the mapping's
keys), which have labels is the caller's device mask.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor


def jacobian_step(
    losses: Mapping[str, Tensor],
    names: Sequence[str],
    inputs: Sequence[Tensor],
    own: Mapping[str, Sequence[Tensor]],
    combine: Callable[[Tensor], tuple[Tensor, Tensor]],
    workspace: Tensor,
    *,
    scale: Tensor | None = None,
    batched: bool = False,
    retain_graph: bool = False,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(surrogate, weights)`` of one step.

    Args:
        losses: the tasks with a loss on this rank (scalars in the graph).
        names: every task, in the order of the Jacobian's rows.
        inputs: the tensors the direction is for (shared parameters, or shared features).
        own: each task's own parameters (its head), which get that task's plain gradient.
        combine: the aggregation, ``T x P`` Jacobian -> (direction ``[P]``, weights ``[T]``).
        workspace: a ``T x P`` float32 matrix to write the rows into (rewritten every step).
        scale: the AMP loss scale (each loss is multiplied by it before its backward, the rows divided by it).
        batched: one ``autograd.grad(..., is_grads_batched=True)`` call instead of one per task.
        retain_graph: keep the graph after the last backward (further terms follow).
        reduce: applied to the Jacobian before ``combine`` (e.g. a DDP average over ranks).

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> losses = {"a": (w**2).sum(), "b": w.sum()}  # gradients [2, 4] and [1, 1]
        >>> mean = lambda jac: (jac.mean(0), torch.full((2,), 0.5))
        >>> surrogate, weights = jacobian_step(losses, ["a", "b"], [w], {}, mean, torch.empty(2, 2))
        >>> surrogate.backward()
        >>> w.grad
        tensor([1.5000, 2.5000])
    """
    jac, head_grads = task_jacobian(losses, names, inputs, own, scale, batched, retain_graph, workspace)
    if reduce is not None:
        jac = reduce(jac)
    direction, weights = combine(jac)
    surrogate = linear_term(inputs, direction)
    heads = [(p, g) for n, gs in head_grads.items() for p, g in zip(own.get(n, ()), gs) if g is not None]
    if heads:
        surrogate = surrogate + fixed_term([p for p, _ in heads], [g for _, g in heads])
    return surrogate, weights


def reuse_step(
    losses: Mapping[str, Tensor],
    weights: Mapping[str, Tensor],
    own: Mapping[str, Sequence[Tensor]],
    scale: Tensor | None = None,
) -> Tensor:
    """The surrogate of a step that reuses earlier weights: ``sum_t w_t L_t`` (one ordinary backward gives
    the shared parameters ``sum_t w_t g_t``), plus a term that gives each head its own, unweighted gradient.

    Example:
        >>> w = torch.tensor(3.0, requires_grad=True)
        >>> head = torch.tensor(2.0, requires_grad=True)
        >>> reuse_step({"a": w * head}, {"a": torch.tensor(0.5)}, {"a": [head]}).backward()
        >>> w.grad, head.grad  # the shared parameter weighted, the head not
        (tensor(1.), tensor(3.))
    """
    first = next(iter(losses.values()))
    surrogate = sum((weights[n] * losses[n] for n in losses), first.new_zeros(()))
    for n, loss in losses.items():
        params = [p for p in own.get(n, ()) if p.requires_grad]
        if not params:
            continue
        scaled = loss if scale is None else loss * scale
        plain = torch.autograd.grad(scaled, params, retain_graph=True, allow_unused=True)
        used = [(p, g) for p, g in zip(params, plain) if g is not None]
        if used:
            factor = 1 - weights[n] if scale is None else (1 - weights[n]) / scale
            surrogate = surrogate + fixed_term([p for p, _ in used], [g * factor for _, g in used])
    return cast(Tensor, surrogate)


def task_jacobian(
    losses: Mapping[str, Tensor],
    names: Sequence[str],
    inputs: Sequence[Tensor],
    own: Mapping[str, Sequence[Tensor]],
    scale: Tensor | None,
    batched: bool,
    retain_last: bool,
    jac: Tensor,
) -> tuple[Tensor, dict[str, tuple[Tensor | None, ...]]]:
    """Rows of ``d L_t / d inputs`` (flattened; zero rows for the tasks without a loss here), divided by
    ``scale``, written into ``jac`` (``len(names) x total size``), and each task's own gradients of ``own[t]``
    (its head) on the way.

    Raises a clear error when none of ``inputs`` is in a task's graph (e.g. parameters an FSDP wrapper
    replaced by flat views): a silent zero row would make every method aggregate nothing.
    """
    sizes = [t.numel() for t in inputs]
    device = inputs[0].device
    heads: dict[str, tuple[Tensor | None, ...]] = {}
    local = [n for n in names if n in losses]
    for i, name in enumerate(names):
        if name not in losses:  # absent on this rank (present on another): a zero row
            jac[i].zero_()

    def scaled(loss: Tensor) -> Tensor:
        return loss if scale is None else loss * scale

    if batched and local:
        extra = [p for n in local for p in own.get(n, ())]
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
        _require_some(grads[: len(inputs)], local[0])
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
            count = len(own.get(n, ()))
            heads[n] = tuple(None if g is None else g[k] for g in grads[start : start + count])
            start += count
    else:
        for i, name in enumerate(names):
            if name not in losses:
                continue
            extra = list(own.get(name, ()))
            last = name == local[-1]
            grads = torch.autograd.grad(
                scaled(losses[name]),
                [*inputs, *extra],
                retain_graph=retain_last or not last,
                allow_unused=True,
            )
            if losses[name].requires_grad:
                _require_some(grads[: len(inputs)], name)
            offset = 0
            for g, size in zip(grads[: len(inputs)], sizes):
                if g is not None:
                    jac[i, offset : offset + size] = g.reshape(-1)
                else:  # this input does not reach task i's loss
                    jac[i, offset : offset + size].zero_()
                offset += size
            heads[name] = tuple(grads[len(inputs) :])
    if scale is not None:
        jac.div_(scale)
        heads = {n: tuple(None if g is None else g / scale for g in gs) for n, gs in heads.items()}
    return jac, heads


def _require_some(grads: Sequence[Tensor | None], task: str) -> None:
    if all(g is None for g in grads):
        raise RuntimeError(
            f"Task {task!r}: its loss does not depend on any of the tensors whose per-task gradients were "
            "asked for (the trainable shared parameters, or the shared features), so its Jacobian row would "
            "be silently 0. Under FSDP the module's parameters are flat views outside the graph: use a "
            "gradient method with mode='features', or a loss-weighting method."
        )


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


def linear_term(tensors: Sequence[Tensor], flat: Tensor) -> Tensor:
    """A term whose gradient with respect to ``tensors`` is ``flat`` split like them (``flat`` is detached)."""
    grads = []
    offset = 0
    for t in tensors:
        n = t.numel()
        grads.append(flat[offset : offset + n].detach().view(t.shape).to(t.dtype))
        offset += n
    return cast(Tensor, _FixedGradient.apply(tuple(grads), *tensors))


def fixed_term(tensors: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
    """A term whose gradient with respect to ``tensors[k]`` is ``grads[k]`` (detached)."""
    return cast(Tensor, _FixedGradient.apply(tuple(g.detach() for g in grads), *tensors))
