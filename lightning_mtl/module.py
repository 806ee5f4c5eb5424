"""``MultiTaskModule``: one backbone, one head + loss + metrics per task, a pluggable balancer."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_mtl.balancing import Balancer, create_balancer
from lightning_mtl.balancing.base import Balanced, StepContext, TaskLosses
from lightning_mtl.batch_checks import check_finite, check_label_keys, host_labelled, nearest_key, num_rows
from lightning_mtl.config_checks import (
    backbone_error,
    check_input_keys,
    check_optimizer_args,
    check_target_keys,
    feature_dims,
    unbatched_error,
)
from lightning_mtl.hub import HubMixin
from lightning_mtl.kinds.base import missing_mask
from lightning_mtl.specs import build_from_spec
from lightning_mtl.tasks import STAGES, Task
from lightning_mtl.transfer import TransferMixin
from lightning_mtl.unit import TaskUnit

Features = Tensor | Mapping[str, Tensor]


@dataclass
class TaskGroup:
    """Examples that share one backbone pass: their inputs, the targets they carry, and the tasks to run."""

    inputs: Any
    targets: dict[str, Tensor]
    tasks: list[str]


class MultiTaskModule(HubMixin, TransferMixin, L.LightningModule):
    """A ``LightningModule`` that trains one backbone for several tasks.

    Args:
        backbone: any ``nn.Module`` mapping inputs to features (a tensor, or a dict of named features
            such as ``{"pooled", "tokens"}``), or a ``{"class_path", "init_args"}`` spec of one.
            Modules with a ``spec()`` method (e.g. :class:`~lightning_mtl.backbones.HFEncoder`) are
            stored as that spec, so checkpoints reload with ``load_from_checkpoint(path)`` alone;
            other live modules must be passed again: ``load_from_checkpoint(path, backbone=...)``.
        tasks: :class:`~lightning_mtl.Task` objects or their dicts.
        balancer: a registered name (:func:`~lightning_mtl.balancing.list_balancers`), a spec, or a
            :class:`~lightning_mtl.balancing.Balancer`; default ``"static"`` (``Task.weight``, 1.0 each).
        feature_dim: width of the backbone's features when it has no ``out_features`` attribute
            (an int, or a dict per feature key). An int that contradicts the width the backbone declares
            (its ``out_features``, or an ``nn.Sequential``'s last ``Linear``) is refused at construction.
        lr: learning rate of the backbone (AdamW). ``head_lr``: of heads and balancer (default ``lr``).
        weight_decay: AdamW weight decay (not applied to biases and norms).
        scheduler: ``None``, ``"linear"`` or ``"cosine"`` decay after ``warmup_ratio`` of the steps.
        input_keys: the batch keys passed to the backbone (default: the backbone's ``input_keys``
            attribute if it has one, else every key that is not a task target).
        train_metrics: update and log the training metrics (``train/<task>/<metric>`` and the epoch mean
            of ``train/<task>/loss``); ``False`` turns them off (validation and test metrics are unaffected).
        train_metrics_every: update the training metrics on every N-th training batch only (default 10):
            torchmetrics drops missing labels by boolean indexing, which waits for the GPU, so the
            steps in between stay free of device->host synchronisation. ``1``: every batch (exact
            epoch metrics, at the cost of a pipeline stall per step on a GPU).
        check_inputs: validate the label values (class range, 0/1, ...) of the first ``check_inputs``
            batches of every stage with a clear error naming the task and key (``True``: 10 batches;
            ``False`` or 0: none). Shapes and dtypes are checked on every batch (free). Value checks read
            the device, so later batches are trusted.
        backbone_class: set automatically (the dotted class of the backbone, kept in the checkpoint so
            that reloading a live, spec-less backbone can name the class to pass again).

    Hooks a subclass may override (each is called by the one above it):
        ``shared_step(batch, stage)`` -> per-task losses;
        ``forward_features(inputs)`` -> backbone features;
        ``compute_losses(outputs, targets, stage)`` -> per-task losses, updating metrics;
        ``extra_losses(features, outputs, group, stage)`` -> named extra terms added to the balanced loss;
        ``configure_optimizers()``.

    Example:
        >>> from lightning_mtl import Task
        >>> module = MultiTaskModule(
        ...     nn.Sequential(nn.Linear(4, 8), nn.ReLU()),
        ...     tasks=[Task("risk", kind="binary", labels=["low", "high"]), Task("stay", kind="regression")],
        ...     feature_dim=8,
        ... )
        >>> preds = module.predict(torch.zeros(2, 4))
        >>> sorted(preds), sorted(preds["risk"][0])
        (['risk', 'stay'], ['label', 'probabilities', 'probability'])
    """

    def __init__(
        self,
        backbone: nn.Module | Mapping[str, Any] | None,
        tasks: Sequence[Task | Mapping[str, Any]],
        balancer: str | Mapping[str, Any] | Balancer | None = None,
        *,
        feature_dim: int | Mapping[str, int] | None = None,
        lr: float = 1e-3,
        head_lr: float | None = None,
        weight_decay: float = 0.0,
        scheduler: str | None = None,
        warmup_ratio: float = 0.0,
        check_inputs: bool | int = True,
        input_keys: Sequence[str] | None = None,
        train_metrics: bool = True,
        train_metrics_every: int = 10,
        backbone_class: str | None = None,
    ) -> None:
        super().__init__()
        task_list = [Task.coerce(t) for t in tasks]
        if not task_list:
            raise ValueError("MultiTaskModule needs at least one Task.")
        names = [t.name for t in task_list]
        if len(set(names)) != len(names):
            raise ValueError(f"Task names must be unique, got {names}.")
        check_target_keys(task_list)
        check_optimizer_args(lr=lr, head_lr=head_lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio)
        if scheduler not in (None, "linear", "cosine"):
            raise ValueError(f"scheduler must be None, 'linear' or 'cosine', got {scheduler!r}.")
        every: Any = train_metrics_every  # typed int; a config file may give anything
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise ValueError(
                f"train_metrics_every must be an integer >= 1, got {train_metrics_every!r}; "
                "e.g. train_metrics_every=10 (or train_metrics=False to turn training metrics off)."
            )
        if not isinstance(check_inputs, (bool, int)) or int(check_inputs) < 0:
            raise ValueError(
                f"check_inputs must be True, False or a number of batches >= 0, got {check_inputs!r}."
            )
        self.tasks: dict[str, Task] = {t.name: t for t in task_list}
        self.backbone: nn.Module
        self.backbone, backbone_hparam = self._build_backbone(backbone, backbone_class)

        check_input_keys(input_keys, getattr(self.backbone, "input_keys", None), task_list)
        self._feature_dims: Any = feature_dims(self.backbone, feature_dim)
        self.units = nn.ModuleDict({t.name: self._build_unit(t) for t in task_list})
        self.balancer = create_balancer(balancer)
        self.balancer.setup(task_list)
        self.check_inputs = check_inputs
        self.check_batches = CHECK_BATCHES if check_inputs is True else int(check_inputs)
        self.train_metrics = train_metrics
        self.train_metrics_every = int(train_metrics_every)
        self._checks_left = dict.fromkeys(STAGES, self.check_batches)
        self._checking = False
        self._metrics_due = True  # training_step sets it: every train_metrics_every-th batch
        self._metrics_now = True
        self._step_features: list[Tensor] = []
        self._step_counts: dict[str, Tensor] = {}
        self._unit_scale = torch.ones(())
        self._losses_before: TaskLosses | None = None
        self._batch_before: Any = None
        self._train_batches = 0
        self._register_load_state_dict_pre_hook(_upgrade_state_keys, with_module=True)

        balancer_hparam = balancer.spec() if isinstance(balancer, Balancer) else balancer
        self.save_hyperparameters(
            {
                "backbone": backbone_hparam,
                "backbone_class": backbone_class
                or f"{type(self.backbone).__module__}.{type(self.backbone).__qualname__}",
                "tasks": [t.to_dict() for t in task_list],
                "balancer": balancer_hparam,
                "feature_dim": dict(feature_dim) if isinstance(feature_dim, Mapping) else feature_dim,
                "lr": lr,
                "head_lr": head_lr,
                "weight_decay": weight_decay,
                "scheduler": scheduler,
                "warmup_ratio": warmup_ratio,
                "check_inputs": check_inputs,
                "input_keys": list(input_keys) if input_keys is not None else None,
                "train_metrics": train_metrics,
                "train_metrics_every": int(train_metrics_every),
            }
        )

    # --- construction helpers -------------------------------------------------------------------
    @staticmethod
    def _build_backbone(backbone: Any, backbone_class: str | None) -> tuple[nn.Module, Any]:
        if backbone is None:
            raise ValueError(
                f"This checkpoint was trained with a live backbone ({backbone_class or 'unknown class'}) that has no "
                "serialisable spec. Pass it again: MultiTaskModule.load_from_checkpoint(path, backbone=<module>), "
                "or give the backbone a `spec()` method returning {'class_path': ..., 'init_args': ...}."
            )
        if isinstance(backbone, Mapping):
            return build_from_spec(backbone, nn.Module, "backbone"), dict(backbone)
        if not isinstance(backbone, nn.Module):
            raise TypeError(
                f"backbone must be an nn.Module or a class_path spec, got {type(backbone).__name__}."
            )
        spec_fn = getattr(backbone, "spec", None)
        return backbone, spec_fn() if callable(spec_fn) else None

    def _build_unit(self, task: Task) -> TaskUnit:
        """The task's unit: its registered head sized from ``feature_dim`` or the backbone's
        ``out_features``, its loss, metrics and loss means."""
        return TaskUnit(task, self._in_features(task, self._feature_dims))

    @property
    def heads(self) -> dict[str, nn.Module]:
        """``{task: head}`` (each lives in its :class:`~lightning_mtl.unit.TaskUnit`, ``units[task].head``)."""
        return {name: unit.head for name, unit in self._units().items()}

    def _units(self) -> dict[str, TaskUnit]:
        return dict(self.units.items())  # type: ignore[arg-type]

    @staticmethod
    def _in_features(task: Task, dims: Any) -> int:
        if isinstance(dims, Mapping):
            if task.feature_key not in dims:
                raise ValueError(
                    f"Task {task.name!r} reads backbone feature {task.feature_key!r}, but feature_dim only has {sorted(dims)}."
                )
            return int(dims[task.feature_key])
        if dims is None:
            raise ValueError(
                f"Cannot size the head of task {task.name!r}: the backbone has no `out_features` attribute. "
                "Pass MultiTaskModule(..., feature_dim=<width of the backbone output>)."
            )
        return int(dims)

    # --- forward ----------------------------------------------------------------------------------
    def forward_features(self, inputs: Any) -> Features:
        """Run the backbone once. A dict with several entries is passed as keyword arguments,
        a single-entry dict or a tensor positionally. Override for other calling conventions."""
        if not isinstance(inputs, Mapping):
            try:
                features = self.backbone(inputs)
            except (RuntimeError, TypeError, ValueError, IndexError) as err:
                raise backbone_error(self.backbone, {"inputs": inputs}, err) from err
            if isinstance(features, Tensor) and features.dim() < 2:  # a shape read, no device sync
                raise unbatched_error(self.backbone, {"inputs": inputs}, features)
            return features  # type: ignore[no-any-return]
        keys = self.hparams.get("input_keys") or getattr(self.backbone, "input_keys", None)
        if keys is not None:
            missing = [k for k in keys if k not in inputs and k != "token_type_ids"]
            if missing:
                raise KeyError(f"The batch lacks backbone input(s) {missing}; it has {sorted(inputs)}.")
            inputs = {k: inputs[k] for k in keys if k in inputs}
        try:
            if len(inputs) == 1:
                features = self.backbone(next(iter(inputs.values())))
            else:
                features = self.backbone(**inputs)
        except TypeError as err:
            if len(inputs) == 1 or "argument" not in str(err):
                raise backbone_error(self.backbone, inputs, err) from err
            raise TypeError(
                f"Calling the backbone {type(self.backbone).__name__} with batch keys {sorted(inputs)} failed ({err}). "
                "Pass MultiTaskModule(..., input_keys=[...]) to choose the keys, or override forward_features()."
            ) from err
        except (RuntimeError, ValueError, IndexError) as err:
            raise backbone_error(self.backbone, inputs, err) from err
        if isinstance(features, Tensor) and features.dim() < 2:  # a shape read, no device sync
            raise unbatched_error(self.backbone, inputs, features)
        return features  # type: ignore[no-any-return]

    def select_features(self, features: Features, task: Task) -> Tensor:
        """The features a task's head reads: the tensor itself, or ``features[task.feature_key]``."""
        return self.units[task.name].select(features)  # type: ignore[operator]

    def run_heads(self, features: Features, task_names: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Raw head outputs of ``task_names`` (default: every task) for one backbone output."""
        units = self._units()
        # unit.forward without nn.Module.__call__: per task and step, its hook machinery is measurable
        return {n: units[n].forward(features) for n in (task_names or self.tasks)}

    @override
    def forward(self, inputs: Any) -> dict[str, Tensor]:
        """Raw head outputs of every task for one batch of inputs (one backbone pass)."""
        return self.run_heads(self.forward_features(inputs))

    # --- batches ----------------------------------------------------------------------------------
    def split_batch(self, batch: Any) -> list[TaskGroup]:
        """Normalise a batch to groups of ``(inputs, targets, tasks)``.

        Accepted: ``{input keys..., <target_key>: labels, ...}`` (one dataset, several label columns; an
        absent key masks the task out), ``(inputs, {task: labels})``, and ``{task: batch_or_None}`` as
        produced by a ``CombinedLoader`` over one dataset per task.
        """
        target_keys = {t.target_key: t.name for t in self.tasks.values()}
        if (
            isinstance(batch, Mapping)
            and batch
            and set(batch) <= set(self.tasks)
            and all(v is None or isinstance(v, Mapping) for v in batch.values())
        ):
            groups = []
            for name, sub in batch.items():
                if sub is None:
                    continue
                key = self.tasks[name].target_key
                if key not in sub:
                    near = nearest_key(key, [str(k) for k in sub])
                    hint = f" Did you mean {near!r}? Set Task({name!r}, target_key={near!r})." if near else ""
                    raise KeyError(
                        f"Task {name!r}: its batch has no target key {key!r}; keys present: {sorted(sub)}.{hint}"
                    )
                inputs = {k: v for k, v in sub.items() if k not in target_keys}
                groups.append(TaskGroup(inputs, {name: sub[key]}, [name]))
            return groups
        if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], Mapping):
            inputs, targets = batch
            unknown = set(targets) - set(self.tasks)
            if unknown:
                raise KeyError(
                    f"Targets for unknown task(s) {sorted(unknown)}; tasks are {sorted(self.tasks)}."
                )
            return [TaskGroup(inputs, dict(targets), list(self.tasks))]
        if isinstance(batch, Mapping):
            inputs = {k: v for k, v in batch.items() if k not in target_keys}
            if not inputs:
                raise KeyError(f"The batch has only target keys {sorted(batch)}; no inputs for the backbone.")
            targets = {target_keys[k]: v for k, v in batch.items() if k in target_keys}
            return [TaskGroup(inputs, targets, list(self.tasks))]
        raise TypeError(
            f"Unsupported batch type {type(batch).__name__}: expected a dict of inputs and targets, "
            "(inputs, {task: target}), or {task: batch} from a CombinedLoader."
        )

    # --- losses -----------------------------------------------------------------------------------
    def compute_losses(
        self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor], stage: str
    ) -> dict[str, Tensor]:
        """Per-task losses of the tasks whose targets are in this batch: the mean over labelled elements (0
        when none is labelled: missing labels are weighed out on dense shapes, never dropped, so this reads
        nothing from the device). Records each task's labelled count for the balancer and updates the
        metrics of ``stage`` when they are due."""
        losses: dict[str, Tensor] = {}
        units = self._units()
        for name, out in outputs.items():
            target = targets.get(name)
            if target is None:
                continue
            task, unit = self.tasks[name], units[name]
            if not isinstance(target, Tensor):
                raise TypeError(
                    f"Task {name!r}, target key {task.target_key!r}: expected a tensor, got {type(target).__name__}."
                )
            if self._checking:
                unit.kind.check(task, out, target)
            else:
                unit.kind.check_shapes(task, out, target)
            loss, count = unit.loss(out, target)
            losses[name] = loss
            self._step_counts[name] = self._step_counts[name] + count if name in self._step_counts else count
            if stage in STAGES and self._metrics_now:
                unit.update_metrics(stage, out, target, loss, count)
        return losses

    def extra_losses(
        self, features: Features, outputs: Mapping[str, Tensor], group: TaskGroup, stage: str
    ) -> dict[str, Tensor]:
        """Extra named loss terms (e.g. an auxiliary regulariser) added after balancing. Default: none."""
        return {}

    def shared_step(self, batch: Any, stage: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Forward every group, return ``(task_losses, extra_losses)``."""
        losses: dict[str, Tensor] = {}
        extras: dict[str, Tensor] = {}
        self._step_features = []
        self._step_counts = {}
        self._metrics_now = stage != "train" or (self.train_metrics and self._metrics_due)
        self._checking = self._checks_left.get(stage, 0) > 0
        if self._checking:
            self._checks_left[stage] -= 1
        for group in self.split_batch(batch):
            self._check_group(batch, group, stage)
            features = self.forward_features(group.inputs)
            if stage == "train":  # the shared representation, for balancers that need it
                self._step_features += [self.select_features(features, self.tasks[n]) for n in group.tasks]
            outputs = self.run_heads(features, group.tasks)
            for name, loss in self.compute_losses(outputs, group.targets, stage).items():
                losses[name] = losses[name] + loss if name in losses else loss
            for name, term in self.extra_losses(features, outputs, group, stage).items():
                extras[name] = extras[name] + term if name in extras else term
        return losses, extras

    def _check_group(self, batch: Any, group: TaskGroup, stage: str) -> None:
        """Every batch: not empty (shapes only). The checked first batches of a stage: finite values and label
        keys that are not misspelled."""
        where = f"{_STAGE_WORDS.get(stage, stage)} batch {self._batch_idx}"
        if num_rows(group.inputs) == 0:
            raise ValueError(
                f"Empty {where}: its inputs have 0 rows (keys: {_batch_keys(batch)}). Check the data source, "
                "filters and sampler: a loader must not yield empty batches."
            )
        if not self._checking:
            return
        target_keys = {t.name: t.target_key for t in self.tasks.values()}
        check_finite(group.inputs, group.targets, target_keys, where)
        if isinstance(batch, Mapping) and not set(batch) <= set(self.tasks):
            keys = self.hparams.get("input_keys") or getattr(self.backbone, "input_keys", None)
            ignored = check_label_keys(batch, target_keys, keys)
            if ignored:
                rank_zero_warn(
                    f"Batch key(s) {ignored} of the {where} are neither backbone inputs (input_keys={list(keys or [])}) "
                    "nor any task's target key, and are ignored. Rename a label column to its task's target_key, "
                    "or drop the column."
                )

    def task_losses(self, losses: Mapping[str, Tensor]) -> TaskLosses:
        """``losses`` of the last :meth:`shared_step` as :class:`~lightning_mtl.balancing.TaskLosses` (with
        the labelled counts, so a task whose labels are all missing is not ``present``)."""
        counts = {n: self._step_counts[n] for n in losses if n in self._step_counts}
        return TaskLosses(losses, list(self.tasks), counts if len(counts) == len(losses) else None)

    # --- Lightning hooks --------------------------------------------------------------------------
    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self._batch_idx = batch_idx
        if self._skip_now:
            return self._skipped_step()
        self._metrics_due = batch_idx % self.train_metrics_every == 0
        raw, extras = self.shared_step(batch, "train")
        if not raw:
            raise ValueError(
                "The training batch holds no target for any task: none of the target keys "
                f"{[t.target_key for t in self.tasks.values()]} is in the batch (keys: {_batch_keys(batch)}). "
                "Name each task's label column with Task(target_key=...)."
            )
        losses = self.task_losses(raw)
        scale = self._loss_scale()
        task_params = self._task_parameters()
        context = StepContext(
            features=self._step_features,
            backbone=self.backbone,
            loss_scale=scale,
            amp_scaled=scale is not self._unit_scale,  # a GradScaler is active
            task_parameters=task_params,
            retain_graph=bool(extras),
        )
        balanced = self.balancer(losses, context)
        self._step_features = []
        if self.balancer.needs_post_step_losses:
            self._losses_before, self._batch_before = losses.detached(), batch
        total = balanced.loss
        for term in extras.values():
            total = total + term
        absent = [n for n in self.tasks if n not in raw]
        if absent:  # keep every head in the graph so DDP does not report unused parameters
            total = total + sum(p.sum() * 0.0 for n in absent for p in task_params[n])
        objective = balanced.objective.detach()
        for term in extras.values():
            objective = objective + term.detach()
        self.log(
            "train/loss", objective, on_step=True, on_epoch=False, prog_bar=True, logger=False, batch_size=1
        )
        self._train_batches += 1
        self._log_step(losses, balanced, objective, extras)
        return total

    def _log_step(
        self, losses: TaskLosses, balanced: Balanced, objective: Tensor, extras: Mapping[str, Tensor]
    ) -> None:
        """Per-step values to the loggers on Lightning's logging steps (every ``log_every_n_steps``), with one
        device->host copy for all of them (:meth:`_step_metrics`); nothing on the other steps."""
        trainer = self._trainer
        if trainer is None or not trainer.loggers or trainer.global_rank != 0:
            return
        every = max(int(getattr(trainer, "log_every_n_steps", 50)), 1)
        if self._train_batches % every != 0 and not trainer.should_stop:
            return
        metrics = {
            **self._step_metrics(losses, balanced, objective, extras),
            "epoch": float(trainer.current_epoch),
        }
        if self.skipped_batches:
            metrics["train/skipped_batches"] = float(self.skipped_batches)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()

    def _step_metrics(
        self, losses: TaskLosses, balanced: Balanced, objective: Tensor, extras: Mapping[str, Tensor]
    ) -> dict[str, float]:
        """``train/loss``, ``train/<task>/loss``, ``weights/<task>`` and ``train/extra/<name>`` of one step as
        numbers (one device->host copy). Tasks without labels in the step are left out, and so are the
        weights of a step whose weights are not finite (an fp16 overflow, which the GradScaler skips)."""
        names = list(losses.task_names)
        parts = [objective.float().reshape(1), losses.vector.detach(), balanced.vector.detach().float()]
        parts += [losses.present.float(), *(t.detach().float().reshape(1) for t in extras.values())]
        values = torch.cat([p.to(objective.device) for p in parts]).tolist()  # the one host read
        t = len(names)
        loss_values, weight_values = values[1 : 1 + t], values[1 + t : 1 + 2 * t]
        present = values[1 + 2 * t : 1 + 3 * t]
        metrics: dict[str, float] = {"train/loss": values[0]}
        weights_finite = all(math.isfinite(w) for w, p in zip(weight_values, present) if p)
        for name, loss, weight, here in zip(names, loss_values, weight_values, present):
            if here:
                metrics[f"train/{name}/loss"] = loss
                if weights_finite:
                    metrics[f"weights/{name}"] = weight
        for name, value in zip(extras, values[1 + 3 * t :]):
            metrics[f"train/extra/{name}"] = value
        return metrics

    def _task_parameters(self) -> Mapping[str, list[nn.Parameter]]:
        """The trainable parameters only task ``t`` uses (its head's and loss module's), gathered when a
        balancer or the step first asks for a task's (loss weighting never does)."""
        return _TaskParameters(self._units())

    def _loss_scale(self) -> Tensor:
        """The AMP GradScaler's current scale as a tensor (no host sync), or 1."""
        trainer = self._trainer
        scaler = getattr(trainer.precision_plugin, "scaler", None) if trainer is not None else None
        if scaler is None or not scaler.is_enabled():
            if self._unit_scale.device != self.device:
                self._unit_scale = torch.ones((), device=self.device)
            return self._unit_scale
        get_async = getattr(scaler, "_get_scale_async", None)
        scale = get_async() if get_async is not None else None
        if scale is None:
            scale = torch.tensor(scaler.get_scale())
        return scale.to(device=self.device, dtype=torch.float32)

    # --- batches without any label ---------------------------------------------------------------
    skip_unlabelled: bool = True
    """Skip a training batch in which every label of every task is missing (no optimizer update; counted in
    ``skipped_batches``, logged as ``train/skipped_batches``, warned once). Under DDP the ranks agree through
    a CPU (gloo) all-reduce of one flag per step, so all skip together iff no rank's batch has a label; left
    out when the datamodule says no training batch can be unlabelled
    (:meth:`~lightning_mtl.data.MultiTaskDataModule.may_yield_unlabelled_batches`).
    Whether a batch has a label is read on the CPU before the batch moves to the device; a loader that yields
    device tensors is checked on the ``check_inputs`` batches only."""
    skipped_batches: int = 0
    """Training batches skipped because no task had a label in them (all ranks together under DDP)."""
    _skip_now = False
    _window: str | None = (
        None  # since the last update: None (no batch), "skipped" (skipped ones only), "labelled"
    )
    _label_hint: bool | None = None
    _skips_possible = True
    _batch_idx = 0

    @override
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Whether the batch holds any label, read from its CPU tensors before they move to the device (for
        the skip of unlabelled training batches and the warning on unlabelled evaluation batches)."""
        trainer = self._trainer
        if trainer is not None and trainer.training and not (self.skip_unlabelled and self._skips_possible):
            self._label_hint = None  # no training batch can be skipped: nothing to read
            return batch
        try:
            self._label_hint = host_labelled(t for g in self.split_batch(batch) for t in g.targets.values())
        except (KeyError, TypeError, ValueError):
            self._label_hint = None  # the step raises its own clear error
        return batch

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        hint, self._label_hint = self._label_hint, None
        self._skip_now = False
        if self.skip_unlabelled and self._skips_possible:
            if hint is None and self._checks_left.get("train", 0) > 0:
                hint = self._any_label(batch)  # reads the device: the checked first batches only
            self._skip_now = not _all_ranks_any(hint is not False, self._trainer)
        self._window = "labelled" if not self._skip_now or self._window == "labelled" else "skipped"

    def _any_label(self, batch: Any) -> bool | None:
        try:
            groups = self.split_batch(batch)
        except (KeyError, TypeError, ValueError):
            return None
        return any(bool((~missing_mask(t)).any()) for g in groups for t in g.targets.values())

    def _skipped_step(self) -> Tensor:
        """A zero loss that reaches every trainable parameter (so DDP's gradient reduction completes on every
        rank); :meth:`optimizer_step` then leaves the parameters and optimizer state untouched."""
        self.skipped_batches += 1
        if self.skipped_batches == 1:
            rank_zero_warn(
                f"Training batch {self._batch_idx} has no label for any task (every target is missing); it is "
                "skipped without an optimizer update. Skipped batches are counted in module.skipped_batches and "
                "logged as train/skipped_batches; this warning is shown once."
            )
        params = [p for p in self.parameters() if p.requires_grad]
        zero = torch.zeros((), device=self.device)
        return zero + sum((p.sum() * 0.0 for p in params), zero)

    @override
    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        if self._window == "skipped":  # every batch since the last update was skipped
            closure = kwargs.get("optimizer_closure", args[3] if len(args) > 3 else None)
            if closure is not None:
                closure()  # the zero loss's backward: DDP reduces gradients on every rank
            self._window = None
            return
        super().optimizer_step(*args, **kwargs)
        self._window = None
        # right after the step, before any ``on_train_batch_end`` callback (a checkpoint taken there holds
        # the balancer's update of this step, and the RNG after it: exact mid-epoch resume)
        batch, self._batch_before = self._batch_before, None
        self._refresh_after_step(batch)

    def _refresh_after_step(self, batch: Any) -> None:
        """After an optimizer step, balancers that ask for it (FAMO) get the batch's losses re-computed."""
        before, self._losses_before = self._losses_before, None
        if not (self.balancer.needs_post_step_losses and before is not None):
            return
        trainer = self._trainer
        context = (
            trainer.precision_plugin.forward_context()
            if trainer is not None
            else torch.autocast("cpu", enabled=False)
        )
        with torch.no_grad(), context:
            after, _ = self.shared_step(batch, "refresh")
        self.balancer.after_step(before, self.task_losses(after).detached())

    @override
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, batch_idx, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, batch_idx, "test")

    def _eval_step(self, batch: Any, batch_idx: int, stage: str) -> None:
        self._batch_idx = batch_idx
        hint, self._label_hint = self._label_hint, None
        losses, _ = self.shared_step(batch, stage)
        warned: set[str] = self.__dict__.setdefault("_unlabelled_warned", set())
        if (hint is False or not losses) and stage not in warned:
            warned.add(stage)
            rank_zero_warn(
                f"{_STAGE_WORDS[stage].capitalize()} batch {batch_idx} has no label for any task (every target is "
                f"missing or absent); it counts for no {stage} metric. Check the {stage} split's label columns. "
                "Warned once per stage."
            )

    @override
    def on_fit_start(self) -> None:
        # Lightning notes that a module's own ``on_before_batch_transfer`` is used when a datamodule is passed:
        # ours only reads whether a batch holds a label (``skip_unlabelled``), which is what every user wants
        warnings.filterwarnings("ignore", message=_OWN_BATCH_HOOK_NOTE)

    @override
    def on_train_start(self) -> None:
        self._checks_left["train"] = self.check_batches
        # data that cannot yield an unlabelled batch (every rank reads the same answer from the same data)
        # needs no per-step agreement on skipping: the gloo all-reduce is left out
        probe = getattr(getattr(self._trainer, "datamodule", None), "may_yield_unlabelled_batches", None)
        self._skips_possible = bool(probe()) if callable(probe) else True

    @override
    def on_validation_start(self) -> None:
        self._checks_left["val"] = self.check_batches

    @override
    def on_test_start(self) -> None:
        self._checks_left["test"] = self.check_batches

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Per-task probabilities (classification) or values (regression) for every group."""
        result: dict[str, list[Tensor]] = {}
        for group in self.split_batch(batch):
            for name, out in self.run_heads(self.forward_features(group.inputs), group.tasks).items():
                task = self.tasks[name]
                result.setdefault(name, []).append(task.kind_obj.postprocess(task, out))
        return {k: torch.cat(v) if len(v) > 1 else v[0] for k, v in result.items()}

    @override
    def on_train_epoch_end(self) -> None:
        self.balancer.on_train_epoch_end()
        if self.train_metrics:
            self._log_epoch_metrics("train")

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    @override
    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def _log_epoch_metrics(self, stage: str) -> None:
        # Every rank computes (torchmetrics syncs the states) and logs the same keys, then resets.
        values: dict[str, Tensor] = {}
        for name, unit in self._units().items():
            for key, value in unit.compute(stage).items():
                values[f"{stage}/{name}/{key}"] = value
        # The values are already global; sync_dist only averages identical numbers (and silences Lightning's hint).
        self.log_dict(values, on_step=False, on_epoch=True, prog_bar=False, sync_dist=True)

    # --- optimisation -----------------------------------------------------------------------------
    @override
    def configure_optimizers(self) -> Any:
        """AdamW over trainable parameters: backbone at ``lr``, heads and balancer at ``head_lr``;
        no weight decay on biases and norm weights; optional warm-up + linear/cosine decay."""
        hp: Any = self.hparams
        head_lr = hp.head_lr if hp.head_lr is not None else hp.lr
        groups: list[dict[str, Any]] = []
        for modules, lr in (
            (self.backbone, hp.lr),
            (nn.ModuleList([self.units, self.balancer]), head_lr),
        ):
            decay: list[nn.Parameter] = []
            no_decay: list[nn.Parameter] = []
            for pname, p in modules.named_parameters():
                if not p.requires_grad:
                    continue
                (no_decay if p.dim() < 2 or "norm" in pname.lower() else decay).append(p)
            groups += [
                {"params": decay, "lr": lr, "weight_decay": hp.weight_decay},
                {"params": no_decay, "lr": lr, "weight_decay": 0.0},
            ]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise ValueError("No trainable parameters: every parameter of the backbone and heads is frozen.")
        optimizer = torch.optim.AdamW(groups)
        if hp.scheduler is None:
            return optimizer
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = int(hp.warmup_ratio * total)
        cosine = hp.scheduler == "cosine"

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return 0.5 * (1 + math.cos(math.pi * progress)) if cosine else 1.0 - progress

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- inference --------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, inputs: Any, batch_size: int = 64) -> dict[str, list[dict[str, Any]]]:
        """Predict every task for raw inputs with one backbone pass per batch.

        ``inputs``: a string or list of strings (the backbone must offer ``preprocess``, as
        :class:`~lightning_mtl.backbones.HFEncoder` does), a tensor, a dict of tensors, or any other raw
        input the backbone's ``preprocess`` reads (e.g. table rows — a DataFrame, a dict, a list of dicts —
        for :class:`~lightning_mtl.backbones.TabularMLP`).
        Returns ``{task: [prediction per example]}`` with label names and probabilities.
        """
        if isinstance(inputs, str) or (
            isinstance(inputs, Sequence) and inputs and all(isinstance(x, str) for x in inputs)
        ):
            texts = [inputs] if isinstance(inputs, str) else list(inputs)
            preprocess = getattr(self.backbone, "preprocess", None)
            if preprocess is None:
                raise TypeError(
                    f"Raw text needs a backbone with `preprocess`; {type(self.backbone).__name__} has none. Pass tensors instead."
                )
            chunks = [preprocess(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
        elif isinstance(inputs, Tensor):
            chunks = list(inputs.split(batch_size))
        elif isinstance(inputs, Mapping) and inputs and all(isinstance(v, Tensor) for v in inputs.values()):
            chunks = self._chunks(inputs, batch_size)
        elif callable(preprocess := getattr(self.backbone, "preprocess", None)):
            chunks = self._chunks(preprocess(inputs), batch_size)  # raw inputs the backbone reads (rows, ...)
        else:
            raise TypeError(
                f"predict() takes text, a tensor or a dict of tensors, got {type(inputs).__name__}."
            )
        was_training = self.training
        self.eval()
        try:
            result: dict[str, list[dict[str, Any]]] = {name: [] for name in self.tasks}
            for chunk in chunks:
                chunk = self._to_device(chunk)
                outputs = self(chunk)
                lengths = (
                    chunk["attention_mask"].sum(1).tolist()
                    if isinstance(chunk, Mapping) and "attention_mask" in chunk
                    else None
                )
                for name, out in outputs.items():
                    result[name].extend(self.tasks[name].describe(out, lengths))
            return result
        finally:
            self.train(was_training)

    @staticmethod
    def _chunks(inputs: Mapping[str, Tensor], batch_size: int) -> list[dict[str, Tensor]]:
        n = next(iter(inputs.values())).shape[0]
        return [{k: v[i : i + batch_size] for k, v in inputs.items()} for i in range(0, n, batch_size)]

    def _to_device(self, obj: Any) -> Any:
        if isinstance(obj, Tensor):
            return obj.to(self.device)
        if isinstance(obj, Mapping):
            return {k: self._to_device(v) for k, v in obj.items()}
        return obj

    @staticmethod
    def upgrade_state_keys(names: Sequence[str]) -> dict[str, str]:
        """``{old: new}`` for state-dict keys written before tasks had units (``heads.<t>.*`` ->
        ``units.<t>.head.*``, ``loss_modules.<t>.*`` -> ``units.<t>.loss_module.*``); other keys map to
        themselves. Checkpoints and artifacts of earlier versions load through it.

        Example:
            >>> MultiTaskModule.upgrade_state_keys(["heads.risk.proj.weight", "backbone.net.0.bias"])
            {'heads.risk.proj.weight': 'units.risk.head.proj.weight', 'backbone.net.0.bias': 'backbone.net.0.bias'}
        """
        return {name: _upgraded_key(name) for name in names}

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[RNG_STATE_KEY] = _rng_states()  # dropout etc. continue exactly on resume

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = [t["name"] for t in checkpoint.get("hyper_parameters", {}).get("tasks", [])]
        if saved and saved != list(self.tasks):
            rank_zero_warn(f"Checkpoint tasks {saved} differ from this module's tasks {list(self.tasks)}.")
        if RNG_STATE_KEY in checkpoint:
            _set_rng_states(checkpoint[RNG_STATE_KEY])


CHECK_BATCHES = 10
"""Batches of each stage whose label values ``check_inputs=True`` validates."""

RNG_STATE_KEY = "lightning_mtl_rng"  # the global RNG states at a checkpoint (torch CPU and CUDA)


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


_OWN_BATCH_HOOK_NOTE = (
    r"You have overridden `on_before_batch_transfer` in `LightningModule` but have passed in a"
)
_STAGE_WORDS = {"train": "training", "val": "validation", "test": "test", "refresh": "training"}


def _all_ranks_any(local: bool, trainer: Any) -> bool:
    """``local`` or-reduced over the DDP ranks through a CPU (gloo) group: no device read."""
    world = int(getattr(trainer, "world_size", 1)) if trainer is not None else 1
    if world <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return local
    flag = torch.tensor([int(local)], dtype=torch.int32)
    torch.distributed.all_reduce(flag, group=_host_group())
    return bool(flag[0])


_HOST_GROUPS: dict[int, Any] = {}


def _host_group() -> Any:
    """A gloo process group over all ranks, created once per default group (the default one if it is gloo)."""
    dist = torch.distributed
    world = dist.group.WORLD
    key = id(world)
    if key not in _HOST_GROUPS:
        _HOST_GROUPS[key] = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _HOST_GROUPS[key]


def _upgraded_key(name: str) -> str:
    for old, new in (("heads.", "head."), ("loss_modules.", "loss_module.")):
        if name.startswith(old):
            task, _, rest = name[len(old) :].partition(".")
            return f"units.{task}.{new}{rest}"
    return name


def _upgrade_state_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook: rename keys of the pre-unit layout in place (see ``upgrade_state_keys``)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        new = prefix + _upgraded_key(key[len(prefix) :])
        if new != key and new not in state_dict:
            state_dict[new] = state_dict.pop(key)


class _TaskParameters(Mapping[str, list[nn.Parameter]]):
    """``{task: its own trainable parameters}``, each list gathered on first access."""

    def __init__(self, units: Mapping[str, TaskUnit]) -> None:
        self._units = units
        self._cache: dict[str, list[nn.Parameter]] = {}

    def __getitem__(self, name: str) -> list[nn.Parameter]:
        if name not in self._cache:
            self._cache[name] = self._units[name].own_parameters()
        return self._cache[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._units)

    def __len__(self) -> int:
        return len(self._units)


def _batch_keys(batch: Any) -> list[str]:
    if isinstance(batch, Mapping):
        return sorted(str(k) for k in batch)
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], Mapping):
        return sorted(str(k) for k in batch[1])
    return [type(batch).__name__]
