"""Bad configuration gets a clear error at construction (or, for inputs the backbone cannot read, at the
backbone call) naming the task, the key or argument, the value given and the fix (issue 9, part 3)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.backbones import MLPBackbone
from lightning_mtl.balancing import create_balancer
from lightning_mtl.config_checks import BackboneInputError

RISK = {"name": "risk", "kind": "binary", "labels": ["low", "high"]}
GROUP = {"name": "group", "kind": "multiclass", "labels": ["a", "b", "c"]}


def task(**changes: Any) -> Task:
    return Task(**{**RISK, **changes})


def module(*tasks: Any, backbone: nn.Module | None = None, **kwargs: Any) -> MultiTaskModule:
    return MultiTaskModule(backbone or MLPBackbone(8, hidden=(16,)), list(tasks) or [RISK], **kwargs)


def step(x: torch.Tensor) -> Any:
    """One training step of the binary task on inputs ``x`` (labels sized to its first dimension)."""
    return module().shared_step({"x": x, "risk": torch.zeros(x.shape[0] if x.dim() else 1)}, "train")


# (id, what raises, exception type, substrings the message must contain: task, key/argument, value, fix)
CASES: list[tuple[str, Callable[[], Any], type[Exception], list[str]]] = [
    # --- Task ---------------------------------------------------------------------------------------
    ("weight-nan", lambda: task(weight=math.nan), ValueError, ["'risk'", "weight", "nan", "weight=1.0"]),
    ("weight-inf", lambda: task(weight=math.inf), ValueError, ["'risk'", "weight", "inf", "weight=1.0"]),
    ("weight-str", lambda: task(weight="heavy"), TypeError, ["'risk'", "weight", "'heavy'", "weight=1.0"]),
    (
        "labels-vs-num-outputs",
        lambda: Task(**GROUP, num_outputs=4),
        ValueError,
        ["'group'", "num_outputs=4", "3 classes", "as many labels"],
    ),
    (
        "num-outputs-0",
        lambda: Task("stay", kind="regression", num_outputs=0),
        ValueError,
        ["'stay'", "num_outputs", "got 0", "num_outputs=3"],
    ),
    (
        "num-outputs-str",
        lambda: Task("stay", kind="regression", num_outputs="3"),
        TypeError,
        ["'stay'", "num_outputs", "'3'", "num_outputs=3"],
    ),
    (
        "binary-num-outputs-2",
        lambda: task(num_outputs=2),
        ValueError,
        ["'risk'", "binary", "num_outputs=2", "kind='multiclass'"],
    ),
    ("name-dot", lambda: task(name="a.b"), ValueError, ["'a.b'", "Task name", "'.'", "rename", "'a_b'"]),
    (
        "name-module-attr",
        lambda: task(name="training"),
        ValueError,
        ["'training'", "Task name", "reserved", "rename"],
    ),
    (
        "name-module-method",
        lambda: task(name="forward"),
        ValueError,
        ["'forward'", "Task name", "reserved", "rename"],
    ),
    (
        "name-logging-key",
        lambda: task(name="extra"),
        ValueError,
        ["'extra'", "Task name", "reserved", "rename"],
    ),
    (
        "multiclass-one-label",
        lambda: Task("group", kind="multiclass", labels=["only"]),
        ValueError,
        ["'group'", "multiclass", "got 1", "['only']", "kind='binary'", ">= 2 labels"],
    ),
    (
        "token-one-class",
        lambda: Task("ner", kind="token", num_outputs=1),
        ValueError,
        ["'ner'", "token", "got 1", "num_outputs=1", ">= 2 labels"],
    ),
    ("threshold", lambda: task(threshold=1.5), ValueError, ["'risk'", "threshold", "1.5", "threshold=0.5"]),
    ("loss-int", lambda: task(loss=3), TypeError, ["'risk'", "loss", "int 3", "class_path"]),
    (
        "loss-spec-without-class-path",
        lambda: task(loss={"init_args": {}}),
        TypeError,
        ["'risk'", "loss", "{'init_args': {}}", "class_path"],
    ),
    (
        "head-unknown",
        lambda: module({**RISK, "head": "mlpp"}),
        KeyError,
        ["'risk'", "head 'mlpp'", "Registered heads", "Task(head="],
    ),
    (
        "head-kwargs-unknown",
        lambda: module({**RISK, "head": "mlp", "head_kwargs": {"width": 64}}),
        TypeError,
        ["'risk'", "'mlp'", "{'width': 64}", "width", "head_kwargs="],
    ),
    (
        "metrics-str",
        lambda: task(metrics="auroc"),
        TypeError,
        ["'risk'", "metrics", "'auroc'", "metrics=['auroc']"],
    ),
    ("labels-str", lambda: task(labels="yes"), TypeError, ["'risk'", "labels", "'yes'", "labels=["]),
    (
        "head-kwargs",
        lambda: task(head_kwargs=[64]),
        TypeError,
        ["'risk'", "head_kwargs", "[64]", "head_kwargs={"],
    ),
    (
        "task-spec-without-name",
        lambda: module({"kind": "binary", "labels": ["low", "high"]}),
        ValueError,
        ["Task spec", "'name'", "'kind': 'binary'", "{'name': 'risk'"],
    ),
    # --- MultiTaskModule ------------------------------------------------------------------------------
    (
        "shared-target-key",
        lambda: module(RISK, {**GROUP, "target_key": "risk"}),
        ValueError,
        ["'risk'", "'group'", "target_key 'risk'", "target_key=<its batch key>"],
    ),
    (
        "target-key-is-input-key",
        lambda: module({**RISK, "target_key": "x"}, input_keys=["x"]),
        ValueError,
        ["'risk'", "target_key 'x'", "input_keys=['x']", "target_key=<its label key>"],
    ),
    (
        "input-keys-str",
        lambda: module(input_keys="x"),
        TypeError,
        ["input_keys", "str 'x'", "input_keys=['x']"],
    ),
    ("lr-0", lambda: module(lr=0.0), ValueError, ["lr", "got 0.0", "lr=1e-3"]),
    ("lr-negative", lambda: module(lr=-1e-3), ValueError, ["lr", "got -0.001", "lr=1e-3"]),
    ("lr-nan", lambda: module(lr=math.nan), ValueError, ["lr", "got nan", "lr=1e-3"]),
    ("lr-str", lambda: module(lr="fast"), TypeError, ["lr", "'fast'", "lr=1e-3"]),
    ("head-lr-0", lambda: module(head_lr=0), ValueError, ["head_lr", "got 0", "head_lr=1e-2"]),
    (
        "weight-decay",
        lambda: module(weight_decay=-0.1),
        ValueError,
        ["weight_decay", "-0.1", "weight_decay=0.01"],
    ),
    (
        "warmup-ratio",
        lambda: module(warmup_ratio=1.0),
        ValueError,
        ["warmup_ratio", "1.0", "warmup_ratio=0.1"],
    ),
    (
        "train-metrics-every-0",
        lambda: module(train_metrics_every=0),
        ValueError,
        ["train_metrics_every", "got 0", "train_metrics_every=10"],
    ),
    (
        "train-metrics-every-float",
        lambda: module(train_metrics_every=2.5),
        ValueError,
        ["train_metrics_every", "2.5", "train_metrics_every=10"],
    ),
    (
        "feature-dim-vs-out-features",
        lambda: module(feature_dim=32),
        ValueError,
        ["feature_dim=32", "MLPBackbone", "declares 16", "feature_dim=16"],
    ),
    (
        "feature-dim-vs-sequential",
        lambda: module(backbone=nn.Sequential(nn.Linear(4, 8), nn.ReLU()), feature_dim=4),
        ValueError,
        ["feature_dim=4", "Sequential", "declares 8", "feature_dim=8"],
    ),
    (
        "feature-dim-0",
        lambda: module(feature_dim=0),
        ValueError,
        ["feature_dim", "got 0", "positive integer"],
    ),
    ("balancer-int", lambda: module(balancer=3), TypeError, ["balancer", "int 3", "balancer='dwa'"]),
    (
        "balancer-spec-without-name",
        lambda: module(balancer={"temperature": 2.0}),
        ValueError,
        ["balancer spec", "{'temperature': 2.0}", "'name'", "'class_path'", "balancer={'name': 'dwa'"],
    ),
    (
        "balancer-arg-str",
        lambda: module(balancer={"name": "dwa", "temperature": "hot"}),
        TypeError,
        ["'dwa'", "temperature", "'hot'", "temperature=2.0"],
    ),
    (
        "balancer-arg-unknown",
        lambda: module(balancer={"name": "dwa", "temp": 2.0}),
        TypeError,
        ["'dwa'", "['temp']", "['temperature']", "rename"],
    ),
    (
        "balancer-arg-inf",
        lambda: create_balancer("dwa", temperature=math.inf),
        ValueError,
        ["'dwa'", "temperature", "inf", "temperature=2.0"],
    ),
    (
        "balancer-class-path-arg-str",
        lambda: create_balancer(
            {
                "class_path": "lightning_mtl.balancing.dwa.DynamicWeightAverage",
                "init_args": {"temperature": "hot"},
            }
        ),
        TypeError,
        ["DynamicWeightAverage", "temperature", "'hot'", "temperature=2.0"],
    ),
    # --- inputs the backbone cannot read (first batch) --------------------------------------------------
    (
        "input-width",
        lambda: step(torch.zeros(4, 5)),
        ValueError,
        ["'x'", "[4, 5]", "float32", "mat1 and mat2", "[batch, 8]", "Fix"],
    ),
    (
        "input-int64",
        lambda: step(torch.zeros(4, 8, dtype=torch.long)),
        ValueError,
        ["'x'", "int64", "float32", "Fix"],
    ),
    ("input-1d", lambda: step(torch.zeros(4)), ValueError, ["'x'", "shape [4]", "[batch, 8]", "Fix"]),
    (
        "input-1d-of-width",
        lambda: step(torch.zeros(8)),
        ValueError,
        ["'x'", "shape [8]", "no batch dimension", "unsqueeze"],
    ),
    (
        "predict-input-width",
        lambda: module().predict(torch.zeros(2, 3)),
        ValueError,
        ["'inputs'", "[2, 3]", "[batch, 8]"],
    ),
]


@pytest.mark.parametrize(("build", "error", "parts"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_is_named(build, error, parts):
    with pytest.raises(error) as info:
        build()
    message = str(info.value)
    missing = [p for p in parts if p not in message]
    assert not missing, f"message lacks {missing}: {message}"


def test_backbone_error_keeps_the_cause():
    with pytest.raises(BackboneInputError) as info:
        step(torch.zeros(4, 5))
    assert isinstance(info.value.__cause__, RuntimeError) and "mat1 and mat2" in str(info.value.__cause__)
    assert isinstance(info.value, RuntimeError)  # what callers caught before (e.g. the CLI's predict)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"feature_dim": 16},
        {"backbone": nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Dropout(0.1)), "feature_dim": 6},
        {"backbone": nn.Sequential(nn.Linear(8, 6), nn.Flatten()), "feature_dim": 6},
        {"balancer": {"name": "dwa", "temperature": 3}, "lr": 1, "train_metrics_every": 1},
    ],
    ids=["declared", "sequential", "undeclared", "int-args"],
)
def test_good_config_still_builds(kwargs):
    m = module(**kwargs)
    assert m({"x": torch.zeros(2, 8)})["risk"].shape == (2, 1)
