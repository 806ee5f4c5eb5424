"""Configuration checks of :class:`~lightning_mtl.MultiTaskModule`, run at construction, and the clear error
for a backbone that cannot read a batch's inputs (the call is wrapped: no cost in the normal path)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_mtl.tasks import Task


class BackboneInputError(ValueError, RuntimeError):
    """The backbone could not read a batch's inputs (their shape or dtype); the message names the input keys
    with their shapes and dtypes. A ``RuntimeError`` too, as the torch error it replaces (``__cause__``) was.

    Example:
        >>> from lightning_mtl import MultiTaskModule
        >>> module = MultiTaskModule(nn.Linear(4, 2), [Task("risk", kind="binary")])
        >>> try:
        ...     module({"x": torch.zeros(3, 5)})
        ... except BackboneInputError as err:
        ...     print(str(err)[:71])
        The backbone Linear failed on batch inputs {'x': shape [3, 5] float32}:
    """


def check_target_keys(tasks: Sequence[Task]) -> None:
    """Two tasks reading one batch key would train two heads on the same labels: a configuration mistake."""
    readers: dict[str, str] = {}
    for task in tasks:
        other = readers.setdefault(task.target_key, task.name)
        if other != task.name:
            raise ValueError(
                f"Tasks {other!r} and {task.name!r} both read target_key {task.target_key!r}; each task needs "
                f"its own labels: set Task({task.name!r}, ..., target_key=<its batch key>)."
            )


def check_input_keys(given: Any, declared: Any, tasks: Sequence[Task]) -> None:
    """``input_keys`` must be a list of batch keys (not one string), none of them a task's target key."""
    if given is not None and (isinstance(given, (str, bytes)) or not all(isinstance(k, str) for k in given)):
        raise TypeError(
            f"MultiTaskModule: input_keys must be a list of batch keys, got {type(given).__name__} {given!r}; "
            f"e.g. input_keys=[{given!r}]."
            if isinstance(given, str)
            else f"MultiTaskModule: input_keys must be a list of batch keys (strings), got {given!r}."
        )
    keys = given if given is not None else declared
    if keys is None or isinstance(keys, (str, bytes)):
        return
    for task in tasks:
        if task.target_key in keys:
            raise ValueError(
                f"Task {task.name!r} reads target_key {task.target_key!r}, which is also a backbone input key "
                f"(input_keys={list(keys)}); the labels would be taken out of the inputs. Set "
                f"Task({task.name!r}, ..., target_key=<its label key>) or change input_keys."
            )


def check_optimizer_args(**values: Any) -> None:
    """``lr``/``head_lr`` > 0, ``weight_decay`` >= 0, ``warmup_ratio`` in [0, 1): finite numbers, else a clear error."""
    rules = {
        "lr": ("a number > 0, e.g. lr=1e-3", lambda v: v > 0),
        "head_lr": ("a number > 0 or None (then lr), e.g. head_lr=1e-2", lambda v: v > 0),
        "weight_decay": ("a number >= 0, e.g. weight_decay=0.01", lambda v: v >= 0),
        "warmup_ratio": ("a fraction of the steps in [0, 1), e.g. warmup_ratio=0.1", lambda v: 0 <= v < 1),
    }
    for key, value in values.items():
        expected, valid = rules[key]
        if value is None and key == "head_lr":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(
                f"MultiTaskModule: {key} must be {expected}, got {type(value).__name__} {value!r}."
            )
        if not (math.isfinite(value) and valid(value)):
            raise ValueError(f"MultiTaskModule: {key} must be {expected}, got {value!r}.")


def declared_width(backbone: nn.Module) -> int | None:
    """The feature width the backbone declares: its ``out_features`` (an int), or for an ``nn.Sequential``
    the ``out_features`` of its last layer that has one, when only width-keeping layers follow it."""
    width = getattr(backbone, "out_features", None)
    if isinstance(width, int) and not isinstance(width, bool):
        return width
    if isinstance(backbone, nn.Sequential):
        for layer in reversed(list(backbone)):
            if isinstance(layer, WIDTH_KEEPING):
                continue
            width = getattr(layer, "out_features", None)
            return width if isinstance(width, int) and not isinstance(width, bool) else None
    return None


WIDTH_KEEPING: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.Dropout,
    nn.Identity,
    nn.LayerNorm,
    nn.BatchNorm1d,
)


def feature_dims(backbone: nn.Module, feature_dim: Any) -> Any:
    """``feature_dim`` checked (positive ints) and against the width the backbone declares, or that width."""
    if feature_dim is None:
        return getattr(backbone, "out_features", None)
    declared = declared_width(backbone)
    widths = dict(feature_dim) if isinstance(feature_dim, Mapping) else {"": feature_dim}
    for key, width in widths.items():
        if isinstance(width, bool) or not isinstance(width, numbers.Integral) or width < 1:
            where = f"feature_dim[{key!r}]" if key else "feature_dim"
            raise ValueError(
                f"MultiTaskModule: {where} must be a positive integer (the backbone's output width), got {width!r}."
            )
    if not isinstance(feature_dim, Mapping) and declared is not None and feature_dim != declared:
        raise ValueError(
            f"MultiTaskModule: feature_dim={feature_dim} does not match the backbone {type(backbone).__name__}, "
            f"which declares {declared} output features (out_features); pass feature_dim={declared} or leave it None."
        )
    return feature_dim


def describe_inputs(inputs: Mapping[str, Any]) -> str:
    parts = []
    for key, value in inputs.items():
        if isinstance(value, Tensor):
            parts.append(f"{key!r}: shape {list(value.shape)} {str(value.dtype).removeprefix('torch.')}")
        else:
            parts.append(f"{key!r}: {type(value).__name__}")
    return "{" + ", ".join(parts) + "}"


def expected_input(backbone: nn.Module) -> str:
    """What the backbone's first layer reads, when it is a linear, convolution or embedding layer."""
    first = next(
        (m for m in backbone.modules() if isinstance(m, (nn.Linear, nn.Embedding, nn.modules.conv._ConvNd))),
        None,
    )
    if isinstance(first, nn.Linear):
        dtype = str(first.weight.dtype).removeprefix("torch.")
        return f"{dtype} inputs of shape [batch, {first.in_features}] (its first layer is Linear({first.in_features}, ...))"
    if isinstance(first, nn.Embedding):
        return (
            f"integer token ids (torch.long) below {first.num_embeddings} (its first layer is an Embedding)"
        )
    if isinstance(first, nn.modules.conv._ConvNd):
        dims = len(first.kernel_size)
        dtype = str(first.weight.dtype).removeprefix("torch.")
        return (
            f"{dtype} inputs of shape [batch, {first.in_channels}, {', '.join(['size'] * dims)}] "
            f"(its first layer is {type(first).__name__} with {first.in_channels} input channels)"
        )
    return "inputs of another shape or dtype"


def backbone_error(backbone: nn.Module, inputs: Mapping[str, Any], err: Exception) -> Exception:
    """A clear error for a backbone call that failed: the batch keys with their shapes and dtypes, what the
    backbone reads where its first layer tells, and the fix; raised ``from`` the original error."""
    if isinstance(err, torch.OutOfMemoryError):
        return err
    message = (
        f"The backbone {type(backbone).__name__} failed on batch inputs {describe_inputs(inputs)}: "
        f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. It expects "
        f"{expected_input(backbone)}. Fix the input keys' shape/dtype (e.g. in the dataset or collate_fn), "
        "choose the keys with MultiTaskModule(input_keys=[...]), or override forward_features()."
    )
    return TypeError(message) if isinstance(err, TypeError) else BackboneInputError(message)


def unbatched_error(backbone: nn.Module, inputs: Mapping[str, Any], features: Tensor) -> ValueError:
    """The backbone returned features without a batch dimension (e.g. a 1-D input read as one example)."""
    return BackboneInputError(
        f"The backbone {type(backbone).__name__} returned features of shape {list(features.shape)} (no batch "
        f"dimension) for batch inputs {describe_inputs(inputs)}. It expects {expected_input(backbone)}; give "
        "each input a leading batch dimension (e.g. x.unsqueeze(0) for one example, or x.unsqueeze(-1) for one "
        "feature per example)."
    )
