"""``MultiTaskModule``: one backbone, one head + loss + metrics per task, a pluggable balancer."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection
from typing_extensions import override

from lightning_mtl._registry import build_from_spec
from lightning_mtl.balancing import Balancer, create_balancer
from lightning_mtl.balancing.base import StepContext
from lightning_mtl.balancing.gradient import GradientBalancer, jacobian_step
from lightning_mtl.heads import create_head
from lightning_mtl.hub import HubMixin
from lightning_mtl.tasks import STAGES, Task
from lightning_mtl.transfer import TransferMixin

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
            (an int, or a dict per feature key).
        lr: learning rate of the backbone (AdamW). ``head_lr``: of heads and balancer (default ``lr``).
        weight_decay: AdamW weight decay (not applied to biases and norms).
        scheduler: ``None``, ``"linear"`` or ``"cosine"`` decay after ``warmup_ratio`` of the steps.
        input_keys: the batch keys passed to the backbone (default: the backbone's ``input_keys``
            attribute if it has one, else every key that is not a task target).
        train_metrics: update and log the training metrics (``train/<task>/<metric>``); ``False`` saves
            two torchmetrics updates per task and step (validation and test metrics are unaffected).
        check_inputs: validate every target's shape, dtype and range with a clear error (one host
            sync per task and step; turn off once the data is known good).
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
        check_inputs: bool = True,
        input_keys: Sequence[str] | None = None,
        train_metrics: bool = True,
        backbone_class: str | None = None,
    ) -> None:
        super().__init__()
        task_list = [Task.coerce(t) for t in tasks]
        if not task_list:
            raise ValueError("MultiTaskModule needs at least one Task.")
        names = [t.name for t in task_list]
        if len(set(names)) != len(names):
            raise ValueError(f"Task names must be unique, got {names}.")
        if scheduler not in (None, "linear", "cosine"):
            raise ValueError(f"scheduler must be None, 'linear' or 'cosine', got {scheduler!r}.")
        self.tasks: dict[str, Task] = {t.name: t for t in task_list}
        self.backbone: nn.Module
        self.backbone, backbone_hparam = self._build_backbone(backbone, backbone_class)

        self._feature_dims = (
            feature_dim if feature_dim is not None else getattr(self.backbone, "out_features", None)
        )
        self.heads = nn.ModuleDict({t.name: self._build_head(t) for t in task_list})
        self.loss_fns = {t.name: t.build_loss() for t in task_list}
        self.loss_modules = nn.ModuleDict(
            {k: v for k, v in self.loss_fns.items() if isinstance(v, nn.Module)}
        )
        self.metrics = nn.ModuleDict({f"{s}_{t.name}": t.build_metrics() for s in STAGES for t in task_list})
        self.loss_means = nn.ModuleDict({f"{s}_{t.name}": MeanMetric() for s in STAGES for t in task_list})
        self.balancer = create_balancer(balancer)
        self.balancer.setup(task_list)
        self.check_inputs = check_inputs
        self.train_metrics = train_metrics
        self._step_features: list[Tensor] = []
        self._unit_scale = torch.ones(())
        self._losses_before: dict[str, Tensor] = {}
        self._stepped = False

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
            module = build_from_spec(dict(backbone), "backbone")
            if not isinstance(module, nn.Module):
                raise TypeError(f"backbone spec built {type(module).__name__}, which is not an nn.Module.")
            return module, dict(backbone)
        if not isinstance(backbone, nn.Module):
            raise TypeError(
                f"backbone must be an nn.Module or a class_path spec, got {type(backbone).__name__}."
            )
        spec_fn = getattr(backbone, "spec", None)
        return backbone, spec_fn() if callable(spec_fn) else None

    def _build_head(self, task: Task) -> nn.Module:
        """The task's registered head, sized from ``feature_dim`` or the backbone's ``out_features``."""
        return create_head(
            task.head_name, self._in_features(task, self._feature_dims), task.out_features, **task.head_kwargs
        )

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
            return self.backbone(inputs)  # type: ignore[no-any-return]
        keys = self.hparams.get("input_keys") or getattr(self.backbone, "input_keys", None)
        if keys is not None:
            missing = [k for k in keys if k not in inputs and k != "token_type_ids"]
            if missing:
                raise KeyError(f"The batch lacks backbone input(s) {missing}; it has {sorted(inputs)}.")
            inputs = {k: inputs[k] for k in keys if k in inputs}
        if len(inputs) == 1:
            return self.backbone(next(iter(inputs.values())))  # type: ignore[no-any-return]
        try:
            return self.backbone(**inputs)  # type: ignore[no-any-return]
        except TypeError as err:
            if "argument" not in str(err):
                raise
            raise TypeError(
                f"Calling the backbone {type(self.backbone).__name__} with batch keys {sorted(inputs)} failed ({err}). "
                "Pass MultiTaskModule(..., input_keys=[...]) to choose the keys, or override forward_features()."
            ) from err

    def select_features(self, features: Features, task: Task) -> Tensor:
        """The features a task's head reads: the tensor itself, or ``features[task.feature_key]``."""
        if isinstance(features, Tensor):
            return features
        if isinstance(features, Mapping):
            if task.feature_key not in features:
                raise KeyError(
                    f"Task {task.name!r} reads feature {task.feature_key!r}, but the backbone returned {sorted(features)}."
                )
            return features[task.feature_key]
        raise TypeError(
            f"The backbone must return a tensor or a dict of tensors, got {type(features).__name__}."
        )

    def run_heads(self, features: Features, task_names: Sequence[str] | None = None) -> dict[str, Tensor]:
        return {
            n: self.heads[n](self.select_features(features, self.tasks[n]))
            for n in (task_names or self.tasks)
        }

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
                    raise KeyError(
                        f"Task {name!r}: its batch has no target key {key!r}; keys present: {sorted(sub)}."
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
        """Masked per-task losses of the tasks with labels in this batch (a task whose labels are absent or
        all masked is left out); updates the metrics of ``stage`` if it is one of ``train/val/test``."""
        losses: dict[str, Tensor] = {}
        for name, out in outputs.items():
            task = self.tasks[name]
            target = targets.get(name)
            if target is None:
                continue
            if not isinstance(target, Tensor):
                raise TypeError(
                    f"Task {name!r}, target key {task.target_key!r}: expected a tensor, got {type(target).__name__}."
                )
            kind = task.kind_obj
            if self.check_inputs:
                kind.check(task, out, target)
            masked = kind.mask(task, out, target)
            if masked.count == 0:
                continue
            loss = self.loss_fns[name](masked.loss_input, masked.loss_target)
            losses[name] = loss
            if stage in STAGES and (self.train_metrics or stage != "train"):
                self._metric(stage, name).update(masked.metric_preds, masked.metric_target)
                self._loss_mean(stage, name).update(loss.detach().float(), weight=masked.count)
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
        for group in self.split_batch(batch):
            features = self.forward_features(group.inputs)
            if stage == "train":  # the shared representation, for balancers that need it
                self._step_features += [self.select_features(features, self.tasks[n]) for n in group.tasks]
            outputs = self.run_heads(features, group.tasks)
            for name, loss in self.compute_losses(outputs, group.targets, stage).items():
                losses[name] = losses[name] + loss if name in losses else loss
            for name, term in self.extra_losses(features, outputs, group, stage).items():
                extras[name] = extras[name] + term if name in extras else term
        return losses, extras

    # --- Lightning hooks --------------------------------------------------------------------------
    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        losses, extras = self.shared_step(batch, "train")
        if not losses:
            raise ValueError(
                "The training batch has no labelled example for any task: nothing to learn from."
            )
        scale = self._loss_scale()
        context = StepContext(
            features=self._step_features,
            backbone=self.backbone,
            loss_scale=scale,
            amp_scaled=scale is not self._unit_scale,  # a GradScaler is active
        )
        task_params = self._task_parameters()
        if isinstance(self.balancer, GradientBalancer):
            balanced = jacobian_step(self.balancer, losses, context, task_params, retain_graph=bool(extras))
        else:
            balanced = self.balancer(losses, context)
        self.balancer.count_step()
        self._step_features = []
        if self.balancer.needs_post_step_losses:
            self._losses_before = {k: v.detach() for k, v in losses.items()}
        total = balanced.loss + sum(extras.values(), torch.zeros((), device=balanced.loss.device))
        absent = [n for n in self.tasks if n not in losses]
        if absent:  # keep every head in the graph so DDP does not report unused parameters
            total = total + sum(p.sum() * 0.0 for n in absent for p in task_params[n])
        bs = self._batch_size(batch)
        for name, loss in losses.items():
            self.log(
                f"train/{name}/loss",
                loss.detach(),
                on_step=True,
                on_epoch=False,
                prog_bar=True,
                batch_size=bs,
            )
        for name, term in extras.items():
            self.log(f"train/extra/{name}", term.detach(), on_step=True, on_epoch=False, batch_size=bs)
        # An fp16 overflow gives NaN weights on a step the GradScaler skips: log only real decisions (the
        # scaler synchronises with the host on this step anyway).
        weights = list(balanced.weights.values())
        if not context.amp_scaled or bool(torch.isfinite(torch.stack(weights)).all()):
            for name, w in balanced.weights.items():
                self.log(f"weights/{name}", w.float(), on_step=True, on_epoch=False, batch_size=bs)
        # The objective: the balanced loss (loss weighting) or, for gradient methods whose returned loss is
        # a surrogate, the plain sum of task losses; extra terms included either way.
        shown = total if self.balancer.family == "loss" else sum(losses.values()) + sum(extras.values())
        self.log("train/loss", cast(Tensor, shown).detach(), on_step=True, on_epoch=False, batch_size=bs)
        return total

    def _task_parameters(self) -> dict[str, list[nn.Parameter]]:
        """The parameters only task ``t`` uses: its head and, if it has any, its loss module's."""
        out: dict[str, list[nn.Parameter]] = {}
        for name in self.tasks:
            params = list(self.heads[name].parameters())
            if name in self.loss_modules:
                params += list(self.loss_modules[name].parameters())
            out[name] = params
        return out

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

    @override
    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self._stepped = True

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After an optimizer step, balancers that ask for it (FAMO) get the batch's losses re-computed."""
        if not (self.balancer.needs_post_step_losses and self._stepped and self._losses_before):
            self._stepped = False
            return
        self._stepped = False
        trainer = self._trainer
        context = (
            trainer.precision_plugin.forward_context()
            if trainer is not None
            else torch.autocast("cpu", enabled=False)
        )
        with torch.no_grad(), context:
            after, _ = self.shared_step(batch, "refresh")
        self.balancer.after_step(self._losses_before, {k: v.detach() for k, v in after.items()})
        self._losses_before = {}

    @override
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.shared_step(batch, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.shared_step(batch, "test")

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
        for name in self.tasks:
            collection = self._metric(stage, name)
            mean = self._loss_mean(stage, name)
            values[f"{stage}/{name}/loss"] = self._safe_compute(mean)
            for key, value in collection.items():
                values[f"{stage}/{name}/{key}"] = self._safe_compute(value)
            collection.reset()
            mean.reset()
        # The values are already global; sync_dist only averages identical numbers (and silences Lightning's hint).
        self.log_dict(values, on_step=False, on_epoch=True, prog_bar=False, sync_dist=True)

    def _metric(self, stage: str, task: str) -> MetricCollection:
        return cast(MetricCollection, self.metrics[f"{stage}_{task}"])

    def _loss_mean(self, stage: str, task: str) -> MeanMetric:
        return cast(MeanMetric, self.loss_means[f"{stage}_{task}"])

    @staticmethod
    def _safe_compute(metric: Any) -> Tensor:
        # A metric never updated (e.g. a task absent from this split) still computes, with a warning we silence.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
            try:
                value = torch.as_tensor(metric.compute(), dtype=torch.float32)
            except ValueError:  # list-state metrics (e.g. AUROC) cannot compute without samples
                if getattr(metric, "update_count", None) != 0:
                    raise
                return torch.tensor(float("nan"))
        return value if value.numel() == 1 else value.mean()

    @staticmethod
    def _batch_size(batch: Any) -> int:
        """Examples in a batch (summed over task groups), for Lightning's logging."""
        if isinstance(batch, Tensor):
            return int(batch.shape[0]) if batch.dim() else 1
        if isinstance(batch, Mapping):
            values = [v for v in batch.values() if v is not None]
            if values and all(isinstance(v, Mapping) for v in values):
                return sum(MultiTaskModule._batch_size(v) for v in values)
            return next((MultiTaskModule._batch_size(v) for v in values if isinstance(v, Tensor)), 1)
        if isinstance(batch, (tuple, list)) and batch:
            return MultiTaskModule._batch_size(batch[0])
        return 1

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
            (nn.ModuleList([self.heads, self.balancer, self.loss_modules]), head_lr),
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
                    described = self.tasks[name].describe(out)
                    if lengths is not None and self.tasks[name].kind == "token":
                        for d, n in zip(described, lengths):
                            d["labels"] = d["labels"][: int(n)]
                    result[name].extend(described)
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

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = [t["name"] for t in checkpoint.get("hyper_parameters", {}).get("tasks", [])]
        if saved and saved != list(self.tasks):
            rank_zero_warn(f"Checkpoint tasks {saved} differ from this module's tasks {list(self.tasks)}.")
