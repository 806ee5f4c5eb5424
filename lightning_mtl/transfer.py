"""Transfer learning on a trained multi-task module: add, remove and isolate tasks, change the balancer.

Mixed into :class:`~lightning_mtl.MultiTaskModule`; kept apart so the module itself stays small.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_mtl.balancing import Balancer, create_balancer
from lightning_mtl.tasks import Task

if TYPE_CHECKING:
    from lightning_mtl.unit import TaskUnit


class TransferMixin:
    """``add_task`` / ``remove_task`` / ``freeze_all_but`` / ``set_balancer`` for :class:`~lightning_mtl.MultiTaskModule`."""

    # provided by MultiTaskModule
    tasks: dict[str, Task]
    backbone: nn.Module
    units: nn.ModuleDict
    balancer: Balancer
    hparams: Any
    device: torch.device

    def _build_unit(self, task: Task) -> TaskUnit:
        raise NotImplementedError  # MultiTaskModule's

    def add_task(self, task: Task | Mapping[str, Any], *, freeze: bool | str = False) -> None:
        """Add a task to a (trained) module: a fresh :class:`~lightning_mtl.unit.TaskUnit` (head sized like
        the constructor sizes them, loss, metrics and loss mean for every stage). The balancer is set up again with all tasks (so the
        ``static`` one picks up ``Task.weight``) and ``hparams["tasks"]`` gains the task, so checkpoints
        and :meth:`save_pretrained` artifacts written afterwards reload with it.

        Args:
            task: a :class:`~lightning_mtl.Task` or its dict; its name must be new (else ``ValueError``).
            freeze: which existing parameters stop training (``requires_grad=False``): ``False`` changes
                nothing (a fresh or loaded module trains everything); ``True`` or ``"all"`` freezes the
                backbone, the old heads and their losses, so only the new head trains; ``"backbone"``
                freezes the backbone, the old heads still train. ``module.unfreeze()`` undoes it.

        Call it between fits, identically on every process: the optimizer (and DDP's gradient buckets)
        are built by ``trainer.fit``, so the next ``fit`` trains the new head. Resuming the *old* run's
        checkpoint with ``ckpt_path=`` does not fit the new parameters; load its weights first instead.
        Freezing is not saved: a reloaded module trains everything again. If anything fails (e.g. a
        balancer with explicit per-task weights), the module is left unchanged.

        With a frozen backbone a gradient balancer (``pcgrad``, ``upgrad``, ...) has no shared gradient to
        aggregate: each head trains on its own task's loss (weight 1). A balancer that needs a trainable
        shared network (``gradnorm``) is refused at once with ``freeze=True``/``"backbone"``; change it first
        with :meth:`set_balancer`.

        Example:
            >>> from lightning_mtl import MultiTaskModule
            >>> from lightning_mtl.backbones import MLPBackbone
            >>> module = MultiTaskModule(MLPBackbone(4, hidden=(8,)), [Task("stay", kind="regression")])
            >>> module.add_task(Task("risk", kind="binary", labels=["low", "high"]), freeze=True)
            >>> list(module.tasks), [t["name"] for t in module.hparams["tasks"]]
            (['stay', 'risk'], ['stay', 'risk'])
            >>> [n for n, p in module.named_parameters() if p.requires_grad]
            ['units.risk.head.proj.weight', 'units.risk.head.proj.bias']
        """
        if not (isinstance(freeze, bool) or freeze in ("all", "backbone")):
            raise ValueError(f"freeze must be False, True, 'all' or 'backbone', got {freeze!r}.")
        new = Task.coerce(task)
        if new.name in self.tasks:
            raise ValueError(f"Task {new.name!r} already exists; the tasks are {list(self.tasks)}.")
        if freeze is not False:
            self._check_frozen_backbone(
                self.balancer,
                f"add_task({new.name!r}, freeze={freeze!r}) freezes the whole backbone",
                "Change the balancer first, e.g. module.set_balancer('equal') (or any gradient method: with a "
                "frozen backbone each head trains on its own loss), or add the task with freeze=False.",
            )
        device, dtype = self._parameter_placement()
        unit = self._build_unit(new)
        unit.to(device=device)
        unit.head.to(dtype=dtype)
        if hasattr(unit, "loss_module"):
            unit.loss_module.to(dtype=dtype)
        self._setup_balancer([*self.tasks.values(), new])

        self.tasks[new.name] = new
        self.units[new.name] = unit
        self.hparams["tasks"] = [*self.hparams["tasks"], new.to_dict()]
        if freeze == "backbone":
            self.backbone.requires_grad_(False)
        elif freeze is True or freeze == "all":
            self.freeze_all_but([new.name])

    def remove_task(self, name: str) -> None:
        """Drop a task (its :class:`~lightning_mtl.unit.TaskUnit`: head, loss, metrics, loss means); the balancer is set up again with the
        remaining tasks and ``hparams["tasks"]`` loses it. The last task cannot be removed.

        Example:
            >>> from lightning_mtl import MultiTaskModule
            >>> from lightning_mtl.backbones import MLPBackbone
            >>> tasks = [Task("stay", kind="regression"), Task("cost", kind="regression")]
            >>> module = MultiTaskModule(MLPBackbone(4, hidden=(8,)), tasks)
            >>> module.remove_task("cost")
            >>> list(module.tasks), list(module.heads), len(module.hparams["tasks"])
            (['stay'], ['stay'], 1)
        """
        if name not in self.tasks:
            raise KeyError(f"No task {name!r}; the tasks are {list(self.tasks)}.")
        if len(self.tasks) == 1:
            raise ValueError(f"Cannot remove {name!r}: a MultiTaskModule needs at least one Task.")
        self._setup_balancer([t for n, t in self.tasks.items() if n != name])
        del self.tasks[name]
        del self.units[name]
        self.hparams["tasks"] = [t for t in self.hparams["tasks"] if t["name"] != name]

    def freeze_all_but(self, task_names: Sequence[str]) -> None:
        """Train only the heads (and loss modules) of ``task_names``: the backbone and every other head
        get ``requires_grad=False``, the named ones ``True``. The balancer is left as it is.

        Example:
            >>> from lightning_mtl import MultiTaskModule
            >>> from lightning_mtl.backbones import MLPBackbone
            >>> tasks = [Task("stay", kind="regression"), Task("cost", kind="regression")]
            >>> module = MultiTaskModule(MLPBackbone(4, hidden=(8,)), tasks)
            >>> module.freeze_all_but(["cost"])
            >>> sorted({n.split(".")[1] for n, p in module.named_parameters() if p.requires_grad})
            ['cost']
        """
        names = [task_names] if isinstance(task_names, str) else list(task_names)
        unknown = [n for n in names if n not in self.tasks]
        if unknown:
            raise KeyError(f"Unknown task(s) {unknown}; the tasks are {list(self.tasks)}.")
        self._check_frozen_backbone(
            self.balancer,
            f"freeze_all_but({names}) freezes the whole backbone",
            "Change the balancer first, e.g. module.set_balancer('equal').",
        )
        self.backbone.requires_grad_(False)
        for n, unit in self.units.items():
            unit.requires_grad_(n in names)

    def set_balancer(self, balancer: str | Mapping[str, Any] | Balancer | None) -> None:
        """Replace the balancer: a registered name, a ``{"name": ..., **kwargs}`` or ``{"class_path",
        "init_args"}`` spec, an instance, or ``None`` (``static``), as the constructor's ``balancer=``.

        The new balancer is set up for the module's tasks with its step state reset (step counter 0; a name
        or spec builds a fresh one), moved to the module's device, and ``hparams["balancer"]`` records it, so
        checkpoints and :meth:`save_pretrained` artifacts written afterwards reload with it. Call it between
        fits (the optimizer, which trains a balancer's own parameters, is built by ``trainer.fit``). If the
        balancer cannot serve the module (e.g. explicit weights missing a task, or ``gradnorm`` with a frozen
        backbone), it raises and the module keeps its balancer.

        Example:
            >>> from lightning_mtl import MultiTaskModule
            >>> from lightning_mtl.backbones import MLPBackbone
            >>> tasks = [Task("stay", kind="regression"), Task("cost", kind="regression")]
            >>> module = MultiTaskModule(MLPBackbone(4, hidden=(8,)), tasks, balancer="pcgrad")
            >>> module.set_balancer({"name": "cagrad", "c": 0.4})
            >>> type(module.balancer).__name__, module.balancer.task_names, module.hparams["balancer"]
            ('CAGrad', ['stay', 'cost'], {'name': 'cagrad', 'c': 0.4})
        """
        new = create_balancer(balancer)
        given = balancer if isinstance(balancer, (str, type(None))) else type(balancer).__name__
        if not any(p.requires_grad for p in self.backbone.parameters()):
            self._check_frozen_backbone(
                new,
                f"set_balancer({given!r}): every backbone parameter is frozen",
                "Unfreeze the backbone first (module.unfreeze()), or choose another balancer, e.g. 'equal'.",
            )
        new.setup(list(self.tasks.values()))  # raises before anything changes
        new.set_step_count(0)
        new.to(self._parameter_placement()[0])
        self.balancer = new
        if isinstance(balancer, Balancer):
            self.hparams["balancer"] = balancer.spec()
        else:
            self.hparams["balancer"] = dict(balancer) if isinstance(balancer, Mapping) else balancer

    @staticmethod
    def _check_frozen_backbone(balancer: Balancer, what: str, fix: str) -> None:
        """Refuse a frozen backbone for a balancer that needs trainable shared parameters (GradNorm)."""
        if balancer.needs_shared_gradients:
            name = balancer.registry_name or type(balancer).__name__
            raise ValueError(
                f"{what}, but balancer {name!r} ({type(balancer).__name__}) measures the tasks' gradients at "
                f"the trainable shared network: with the backbone frozen it has nothing to balance. {fix}"
            )

    def _setup_balancer(self, tasks: list[Task]) -> None:
        """Set the balancer up for ``tasks``; on failure set it up again for the current tasks and re-raise."""
        try:
            self.balancer.setup(tasks)
        except Exception:
            self.balancer.setup(list(self.tasks.values()))
            raise
        self.balancer.to(self._parameter_placement()[0])

    def _parameter_placement(self) -> tuple[torch.device, torch.dtype]:
        """Device and floating dtype of the existing heads (else the backbone), for new modules."""
        for params in (self.units.parameters(), self.backbone.parameters()):
            for p in params:
                if p.is_floating_point():
                    return p.device, p.dtype
        return self.device, torch.get_default_dtype()
