"""The balancer interface and registry (DESIGN.md section 4).

A balancer turns the per-task losses of a step into the quantity the optimizer follows. Two families:

* ``loss`` weighting: ``losses -> one scalar``; runs under Lightning's automatic optimization, so every
  precision and strategy works unchanged. :meth:`Balancer.forward` returns the scalar and the weights.
* ``gradient`` aggregation: per-task gradients of the shared parameters (or of the shared
  representation) -> one update direction (MGDA, PCGrad, ...). Those subclass
  :class:`~lightning_mtl.balancing.gradient.GradientBalancer`. The module still runs under Lightning's
  *automatic* optimization: it returns a surrogate loss whose gradient is exactly the aggregated
  direction, so gradient clipping, accumulation, AMP loss scaling and DDP reduction all keep working.

The module calls the balancer once per training step, ``balancer(losses, context)``: ``losses`` is a
:class:`TaskLosses` (the per-task losses, with dense device-side views over all tasks), ``context`` a
:class:`StepContext`. A gradient method runs its own Jacobian step inside that call. The base class counts
the calls (:attr:`Balancer.step_count`).

Nothing in a balancer's step reads the device from the host (no ``.item()``, ``int(tensor)``, boolean
indexing): which tasks have labels in a step is the device tensor :attr:`TaskLosses.present`, never a
Python decision, so a step never stalls a GPU.

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

import math
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_mtl._registry import Registry
from lightning_mtl.specs import build_from_spec, resolve_class

if TYPE_CHECKING:
    from lightning_mtl.tasks import Task

BALANCER_REGISTRY: Registry[type[Balancer]] = Registry("balancer")


class TaskLosses(Mapping[str, Tensor]):
    """The per-task losses of one step: a mapping over the tasks that have targets in the batch (each a
    scalar in the autograd graph), plus dense views over all ``task_names`` (the balancer's order) that
    are computed on the device and never read from the host.

    ``counts``: the number of labelled elements of each task in the mapping (tensors); a task whose count is
    0 (every label of the batch missing) has loss 0 and is not :attr:`present`. Without counts every task
    of the mapping is present.

    Example:
        >>> losses = TaskLosses({"a": torch.tensor(2.0)}, ["a", "b"])
        >>> losses.vector, losses.present
        (tensor([2., 0.]), tensor([ True, False]))
        >>> dict(losses)
        {'a': tensor(2.)}
    """

    def __init__(
        self,
        losses: Mapping[str, Tensor],
        task_names: Sequence[str],
        counts: Mapping[str, Tensor] | None = None,
    ) -> None:
        self._losses = dict(losses)
        self.task_names: tuple[str, ...] = tuple(task_names)
        unknown = [n for n in self._losses if n not in self.task_names]
        if unknown:
            raise KeyError(f"Losses for unknown task(s) {unknown}; the tasks are {list(self.task_names)}.")
        self._counts = dict(counts) if counts is not None else None

    @classmethod
    def coerce(cls, losses: Mapping[str, Tensor], task_names: Sequence[str]) -> TaskLosses:
        """``losses`` as :class:`TaskLosses` over ``task_names`` (or over its own keys if none are given)."""
        if isinstance(losses, TaskLosses):
            return losses
        return cls(losses, task_names or list(losses))

    def __getitem__(self, name: str) -> Tensor:
        return self._losses[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._losses)

    def __len__(self) -> int:
        return len(self._losses)

    def _dense(self, values: Mapping[str, Tensor], dtype: torch.dtype) -> Tensor:
        first = next(iter(self._losses.values()))
        zero = first.new_zeros((), dtype=dtype)
        rows = [values.get(n, zero) for n in self.task_names]
        rows = [r if r.dtype == dtype else r.to(dtype) for r in rows]
        return torch.stack(rows)

    @cached_property
    def vector(self) -> Tensor:
        """Float32 losses of every task in ``task_names`` order, 0 for tasks without a loss (in the graph)."""
        return self._dense(self._losses, torch.float32)

    @cached_property
    def counts(self) -> Tensor:
        """Labelled elements per task, float32, 0 for tasks without a loss."""
        if self._counts is None:
            return self._dense({n: v.new_ones(()) for n, v in self._losses.items()}, torch.float32)
        return self._dense(self._counts, torch.float32)

    @cached_property
    def present(self) -> Tensor:
        """Bool: the task has at least one labelled element in this step (on this rank)."""
        return self.counts > 0

    def detached(self) -> TaskLosses:
        """The same losses cut from the autograd graph (e.g. to compare them after the optimizer step)."""
        return TaskLosses({n: v.detach() for n, v in self._losses.items()}, self.task_names, self._counts)


@dataclass
class StepContext:
    """What the module tells a balancer about the current training step, beyond the losses.

    ``features``: the shared representation tensors the heads read (in the autograd graph);
    ``backbone``: the shared network (its trainable parameters are the shared parameters);
    ``loss_scale``: the AMP loss scale as a tensor (``1.0`` without a ``GradScaler``), by which a balancer
    multiplies a loss before its own ``torch.autograd.grad`` call and divides the result, so fp16
    gradients do not underflow and no absolute epsilon ever sees scaled values;
    ``amp_scaled``: whether a GradScaler is active (``loss_scale`` may then differ from 1);
    ``task_parameters``: the parameters only each task uses (its head and loss module);
    ``retain_graph``: keep the graph after a gradient balancer's own backward passes (the module adds
    further terms, e.g. extra losses).
    """

    features: list[Tensor]
    backbone: nn.Module
    loss_scale: Tensor
    amp_scaled: bool = False
    task_parameters: Mapping[str, Sequence[nn.Parameter]] = field(default_factory=dict)
    retain_graph: bool = False

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.backbone.parameters() if p.requires_grad]


class Balanced:
    """What a balancer returns: the ``loss`` to back-propagate, the weight it gave each task, and the
    ``objective`` to report as ``train/loss`` (the loss itself, or for gradient methods, whose ``loss`` is a
    surrogate, the plain sum of the task losses).

    ``weights`` may be given as a tensor over ``task_names`` (0 for tasks absent from the step) or as a
    ``{task: weight}`` dict; :attr:`weights` reads as a dict over the tasks of the step, :attr:`vector` as the
    dense tensor (logged as ``weights/<task>``).

    Example:
        >>> out = Balanced(torch.tensor(3.0), torch.tensor([1.0, 2.0]), task_names=("a", "b"))
        >>> out.weights
        {'a': tensor(1.), 'b': tensor(2.)}
    """

    def __init__(
        self,
        loss: Tensor,
        weights: Tensor | Mapping[str, Tensor],
        *,
        task_names: Sequence[str] | None = None,
        names: Sequence[str] | None = None,
        objective: Tensor | None = None,
    ) -> None:
        self.loss = loss
        self.objective = loss if objective is None else objective
        if isinstance(weights, Mapping):
            self._dict: dict[str, Tensor] | None = dict(weights)
            self.task_names = tuple(task_names or self._dict)
            self.names = tuple(names or self._dict)
            self._vector: Tensor | None = None
        else:
            if task_names is None:
                raise ValueError("Balanced: weights given as a tensor need task_names.")
            self._dict, self._vector = None, weights
            self.task_names = tuple(task_names)
            self.names = tuple(names if names is not None else task_names)

    @classmethod
    def of(
        cls, losses: TaskLosses, loss: Tensor, weights: Tensor, objective: Tensor | None = None
    ) -> Balanced:
        """The result for one step's ``losses``: ``weights`` dense over ``losses.task_names``, reported for
        the tasks of the step."""
        return cls(loss, weights, task_names=losses.task_names, names=tuple(losses), objective=objective)

    @property
    def vector(self) -> Tensor:
        """The weights over ``task_names`` as one tensor (0 where a task has none)."""
        if self._vector is None:
            assert self._dict is not None
            first = next(iter(self._dict.values()), self.loss)
            zero = first.new_zeros((), dtype=torch.float32)
            self._vector = torch.stack([self._dict.get(n, zero).float() for n in self.task_names])
        return self._vector

    @property
    def weights(self) -> dict[str, Tensor]:
        """``{task: weight}`` over the tasks of the step."""
        if self._dict is None:
            assert self._vector is not None
            index = {n: i for i, n in enumerate(self.task_names)}
            self._dict = {n: self._vector[index[n]] for n in self.names}
        return self._dict


class Balancer(nn.Module):
    """Base class of all balancers.

    Class attributes declare behaviour: ``family`` (``"loss"`` or ``"gradient"``),
    ``uses_task_weights`` (whether ``Task.weight`` means something to this method; if not, a task
    with a non-default weight is an error rather than a silently ignored setting),
    ``needs_post_step_losses`` (call :meth:`after_step`), ``stateful`` (keep the step counter in
    the state dict; stateless methods such as ``static`` save nothing) and ``needs_shared_gradients`` (the
    method measures the tasks' gradients at a trainable shared network and has nothing to work with when the
    whole backbone is frozen, as GradNorm: ``add_task(freeze=...)`` and ``freeze_all_but`` refuse it).

    Per-task state belongs in buffers or parameters created in :meth:`setup`, so it is checkpointed.
    """

    family: ClassVar[str] = "loss"
    uses_task_weights: ClassVar[bool] = False
    needs_post_step_losses: ClassVar[bool] = False
    stateful: ClassVar[bool] = True
    needs_shared_gradients: ClassVar[bool] = False
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

    def __call__(self, losses: Mapping[str, Tensor], context: StepContext | None = None) -> Balanced:
        """Balance one step: ``losses`` (a :class:`TaskLosses`, or a plain ``{task: loss}`` dict) -> the
        :class:`Balanced` result; counts the step (:attr:`step_count`) after :meth:`forward` ran."""
        losses = TaskLosses.coerce(losses, self.task_names)
        out = super().__call__(losses) if context is None else super().__call__(losses, context)
        self.count_step()
        return out  # type: ignore[no-any-return]

    def forward(self, losses: TaskLosses, context: StepContext | None = None) -> Balanced:
        """Combine one step's task losses. ``losses.vector``/``losses.present`` are dense over
        ``task_names``; a task without labels in the step has loss 0 and ``present`` False."""
        raise NotImplementedError

    def on_train_epoch_end(self) -> None:
        """Called by the module at the end of every training epoch (on every rank)."""

    def after_step(self, before: TaskLosses, after: TaskLosses) -> None:
        """Called after each optimizer step when ``needs_post_step_losses``: the losses of the same batch
        before and after the update (detached)."""

    # --- helpers for subclasses ---------------------------------------------------------------------
    def reduce_per_task(self, values: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        """Average per-task values (dense over ``task_names``) over the DDP ranks where each task is present.

        Returns ``(mean, present)``: ``present`` marks the tasks present on at least one rank, ``mean`` is 0
        elsewhere. Without a process group: the local values (0 where absent) and presence. A collective:
        call it on every rank, every step. No host read.
        """
        present_f = present.to(values.dtype)
        values = torch.where(present, values, torch.zeros_like(values))
        if is_distributed():
            both = torch.stack([values, present_f])
            torch.distributed.all_reduce(both)
            values, present_f = both[0], both[1]
        anywhere = present_f > 0
        return torch.where(anywhere, values / present_f.clamp_min(1.0), torch.zeros_like(values)), anywhere

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
        for cls in type(self).__mro__:  # a method's own arguments, then the ones it passes on (**options)
            init = cls.__dict__.get("__init__")
            if init is None:
                continue
            params = inspect.signature(init).parameters
            for name, param in params.items():
                if name in out or name == "self" or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
                    continue
                if hasattr(self, name):
                    value = getattr(self, name)
                    out[name] = list(value) if isinstance(value, tuple) else value
            if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                break  # it passes nothing on: the base's arguments are not its own
        return out

    def spec(self) -> dict[str, Any]:
        return {
            "class_path": f"{type(self).__module__}.{type(self).__qualname__}",
            "init_args": self.config(),
        }

    def weighted_sum(self, losses: TaskLosses, weights: Tensor | Mapping[str, float | Tensor]) -> Balanced:
        """``sum_t w_t L_t`` with ``weights`` dense over ``task_names`` (tasks without a loss add 0), or a
        ``{task: weight}`` dict (missing tasks weigh 0)."""
        if isinstance(weights, Mapping):
            weights = torch.stack(
                [torch.as_tensor(weights.get(n, 0.0), dtype=torch.float32) for n in losses.task_names]
            ).to(losses.vector.device)
        return Balanced.of(losses, (weights * losses.vector).sum(), weights)


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
        ...     def forward(self, losses, context=None):  # all weight on the largest loss, on the device
        ...         worst = losses.vector == losses.vector.max()
        ...         return self.weighted_sum(losses, worst.float())
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


def create_balancer(balancer: str | Mapping[str, Any] | Balancer | None, **kwargs: Any) -> Balancer:
    """Build a balancer from a registered name (with its arguments as ``kwargs``), a
    ``{"name": ..., <arguments>}`` or ``{"class_path", "init_args"}`` spec, or an instance. The arguments
    are checked against the balancer's constructor first (unknown keys, non-numbers where a number belongs).

    Example:
        >>> create_balancer("static")
        StaticWeighting()
        >>> create_balancer("dwa", temperature=4.0).temperature
        4.0
    """
    if kwargs and not isinstance(balancer, str):
        raise TypeError(
            f"create_balancer: keyword arguments {sorted(kwargs)} go with a registered name only, got "
            f"{type(balancer).__name__}; put them in the spec instead."
        )
    if balancer is None:
        balancer = "static"
    if isinstance(balancer, Balancer):
        return balancer
    if isinstance(balancer, str):
        cls = BALANCER_REGISTRY.get(balancer)
        check_balancer_args(cls, kwargs, repr(balancer))
        return cls(**kwargs)
    if not isinstance(balancer, Mapping):
        raise TypeError(
            f"balancer must be a registered name ({list_balancers()}), a {{'name': ..., <arguments>}} or "
            f"{{'class_path': ..., 'init_args': ...}} dict, or a Balancer, got {type(balancer).__name__} {balancer!r:.80}; "
            "e.g. balancer='dwa' or balancer={'name': 'dwa', 'temperature': 2.0}."
        )
    if "name" in balancer:
        kwargs = {k: v for k, v in balancer.items() if k != "name"}
        cls = BALANCER_REGISTRY.get(balancer["name"])
        check_balancer_args(cls, kwargs, repr(balancer["name"]))
        return cls(**kwargs)
    if "class_path" not in balancer:
        raise ValueError(
            f"balancer spec {dict(balancer)!r:.120} has neither 'name' (a registered balancer: {list_balancers()}) "
            "nor 'class_path'; e.g. balancer={'name': 'dwa', 'temperature': 2.0}."
        )
    spec_cls = resolve_class(
        balancer["class_path"], Balancer, "balancer"
    )  # trusted, a Balancer: before a call
    if isinstance(balancer.get("init_args"), Mapping):
        check_balancer_args(spec_cls, dict(balancer["init_args"]), repr(balancer["class_path"]))
    return build_from_spec(balancer, Balancer, "balancer")


def check_balancer_args(cls: type[Balancer], kwargs: Mapping[str, Any], what: str) -> None:
    """Check the arguments of balancer ``cls`` against its constructor before building it: every key must be
    a parameter, and a parameter whose default is a number must get a finite number (a bool one a bool).

    Example:
        >>> from lightning_mtl.balancing.dwa import DynamicWeightAverage
        >>> check_balancer_args(DynamicWeightAverage, {"temperature": "hot"}, "'dwa'")
        Traceback (most recent call last):
        ...
        TypeError: Balancer 'dwa': argument temperature must be a number (like its default 2.0), got str 'hot'; e.g. temperature=2.0.
    """
    import inspect

    params: dict[str, inspect.Parameter] = {}
    open_kwargs = False
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is nn.Module or klass is object:
            continue
        sig = inspect.signature(init).parameters
        for name, param in sig.items():
            if name != "self" and param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
                params.setdefault(name, param)
        if not any(p.kind is p.VAR_KEYWORD for p in sig.values()):
            break
    else:
        open_kwargs = True
    unknown = sorted(k for k in kwargs if k not in params)
    if unknown and not open_kwargs:
        raise TypeError(
            f"Balancer {what}: unknown argument(s) {unknown}; it takes {sorted(params)}. Remove or rename them."
        )
    for key, value in kwargs.items():
        default = params[key].default if key in params else inspect.Parameter.empty
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise TypeError(
                    f"Balancer {what}: argument {key} must be True or False, got {type(value).__name__} {value!r}."
                )
        elif isinstance(default, (int, float)):
            annotation = str(params[key].annotation)
            if isinstance(value, Mapping) and ("Mapping" in annotation or "dict" in annotation):
                for item in value.values():  # a per-task form, e.g. FAMO's min_losses={task: value}
                    check_balancer_args(cls, {key: item}, what)
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(
                    f"Balancer {what}: argument {key} must be a number (like its default {default!r}), got "
                    f"{type(value).__name__} {value!r}; e.g. {key}={default!r}."
                )
            if not math.isfinite(value):
                raise ValueError(
                    f"Balancer {what}: argument {key} must be a finite number, got {value!r}; e.g. {key}={default!r}."
                )
