"""The schema check of a zoo entry: every problem of its ``config.json`` (and files) as one list.

Stricter than loading: a zoo entry must also carry a licence, metrics for every task and, when its
weights are not shipped, the recipe that produces them. Each problem names the field, e.g.
``"hparams.tasks[1].kind: unknown kind 'binery'; ..."``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from lightning_mtl.artifact import (
    CARD_NAME,
    CONFIG_NAME,
    LIBRARY_NAME,
    SCHEMA_VERSION,
    WEIGHTS_NAME,
    ArtifactError,
    read_json,
)
from lightning_mtl.artifact._tensors import _read_header
from lightning_mtl.specs import resolve_class

REQUIRED_KEYS = (
    "schema_version",
    "library",
    "module_class",
    "hparams",
    "preprocessing",
    "metrics",
    "card",
    "weights",
)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def validate_entry(path: str | Path) -> list[str]:
    """Schema problems of the zoo entry folder ``path``; an empty list means it is valid.

    Example:
        >>> import tempfile
        >>> from lightning_mtl import MultiTaskModule, Task
        >>> from lightning_mtl.backbones import MLPBackbone
        >>> from lightning_mtl.artifact import save_pretrained
        >>> module = MultiTaskModule(MLPBackbone(4, hidden=(8,)), [Task("stay", kind="regression")])
        >>> folder = save_pretrained(module, Path(tempfile.mkdtemp()) / "stay", metrics={"stay": {"mae": 1.5}})
        >>> validate_entry(folder)
        ['card.license: missing; a zoo entry states its licence (e.g. "apache-2.0")']
    """
    folder = Path(path)
    if not folder.is_dir():
        return [f"{folder}: not a directory"]
    try:
        config = read_json(folder / CONFIG_NAME)  # the reader loading uses
    except ArtifactError as err:
        return [f"{CONFIG_NAME}: {err.problem}"]

    problems = [f"{key}: missing" for key in REQUIRED_KEYS if key not in config]
    _check_header(config, problems)
    tasks = _check_tasks(config.get("hparams"), problems)
    _check_metrics(config.get("metrics"), tasks, problems)
    weights_present = (folder / WEIGHTS_NAME).is_file()
    _check_card(config.get("card"), folder.name, weights_present, problems)
    _check_weights(config.get("weights"), folder, problems)
    if not (folder / CARD_NAME).is_file():
        problems.append(f"{CARD_NAME}: missing; the model card ships with the artifact")
    return problems


def _check_header(config: dict[str, Any], problems: list[str]) -> None:
    version = config.get("schema_version")
    if "schema_version" in config and (
        not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= SCHEMA_VERSION
    ):
        problems.append(f"schema_version: must be an integer from 1 to {SCHEMA_VERSION}, got {version!r}")
    library = config.get("library")
    if "library" in config and (not isinstance(library, dict) or library.get("name") != LIBRARY_NAME):
        problems.append(f"library: must be {{'name': {LIBRARY_NAME!r}, 'version': ...}}, got {library!r}")
    module_class = config.get("module_class")
    if "module_class" in config:
        from lightning_mtl.module import MultiTaskModule

        try:
            resolve_class(module_class, MultiTaskModule, "module_class")
        except (ImportError, ValueError) as err:
            problems.append(str(err))


def _check_tasks(hparams: Any, problems: list[str]) -> list[str]:
    """Check ``hparams.backbone`` and ``hparams.tasks``; return the names of the tasks."""
    from lightning_mtl.kinds import get_kind, list_kinds
    from lightning_mtl.tasks import Task

    if hparams is None:
        return []
    if not isinstance(hparams, dict):
        problems.append(f"hparams: must be an object, got {type(hparams).__name__}")
        return []
    backbone = hparams.get("backbone")
    if not isinstance(backbone, dict) or not isinstance(backbone.get("class_path"), str):
        problems.append("hparams.backbone: must be a {'class_path': ..., 'init_args': ...} spec")
    tasks = hparams.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        problems.append("hparams.tasks: must be a non-empty list of task specs")
        return []
    names: list[str] = []
    for i, task in enumerate(tasks):
        where = f"hparams.tasks[{i}]"
        if not isinstance(task, dict):
            problems.append(f"{where}: must be an object, got {type(task).__name__}")
            continue
        before = len(problems)
        name = task.get("name")
        if not isinstance(name, str) or not name:
            problems.append(f"{where}.name: must be a non-empty string, got {name!r}")
        elif name in names:
            problems.append(f"{where}.name: duplicate task name {name!r}")
        else:
            names.append(name)
        kind = task.get("kind")
        if kind not in list_kinds():
            problems.append(f"{where}.kind: unknown kind {kind!r}; known kinds: {list_kinds()}")
        labels = task.get("labels")
        if labels is not None:
            if not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels):
                problems.append(f"{where}.labels: must be a list of non-empty strings, got {labels!r}")
            elif len(set(labels)) != len(labels):
                problems.append(f"{where}.labels: duplicate labels in {labels}")
        elif kind in list_kinds() and get_kind(kind).needs_labels and task.get("num_outputs") is None:
            problems.append(f"{where}.labels: kind {kind!r} needs labels (or num_outputs)")
        if len(problems) == before:
            try:
                Task.from_dict(task)
            except (TypeError, ValueError) as err:
                problems.append(f"{where}: {err}")
    return names


def _check_metrics(metrics: Any, tasks: list[str], problems: list[str]) -> None:
    if metrics is None:
        return
    if not isinstance(metrics, dict):
        problems.append(f"metrics: must be {{task: {{metric: value}}}}, got {type(metrics).__name__}")
        return
    for task, values in metrics.items():
        if tasks and task not in tasks:
            problems.append(f"metrics.{task}: not a task of this model (tasks: {tasks})")
        if not isinstance(values, dict):
            problems.append(f"metrics.{task}: must be {{metric: value}}, got {values!r}")
            continue
        for metric, value in values.items():
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if value is not None and not (number and math.isfinite(value)):
                problems.append(f"metrics.{task}.{metric}: not a number: {value!r}")
    missing = [t for t in tasks if not metrics.get(t)]
    if missing:
        problems.append(f"metrics: no metric recorded for task(s) {missing}; a zoo entry reports every task")


def _check_card(card: Any, folder_name: str, weights_present: bool, problems: list[str]) -> None:
    if card is None:
        return
    if not isinstance(card, dict):
        problems.append(f"card: must be an object, got {type(card).__name__}")
        return
    license_ = card.get("license")
    if not isinstance(license_, str) or not license_.strip():
        problems.append('card.license: missing; a zoo entry states its licence (e.g. "apache-2.0")')
    name = card.get("name")
    if name is not None and name != folder_name:
        problems.append(
            f"card.name: {name!r} does not match the entry's folder name {folder_name!r} (the entry's name)"
        )
    for key in ("description", "training_data", "intended_use", "limitations"):
        if card.get(key) is not None and not isinstance(card[key], str):
            problems.append(f"card.{key}: must be a string, got {card[key]!r}")
    for key in ("datasets", "tags", "language"):
        value = card.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            problems.append(f"card.{key}: must be a list of strings, got {value!r}")
    recipe = card.get("recipe")
    if recipe is not None and not isinstance(recipe, (str, dict)):
        problems.append(f"card.recipe: must be a string or an object, got {recipe!r}")
    if not weights_present and not recipe:
        problems.append(f"card.recipe: {WEIGHTS_NAME} is not present, and no recipe says how to produce it")


def _check_weights(weights: Any, folder: Path, problems: list[str]) -> None:
    if weights is None:
        return
    if not isinstance(weights, dict):
        problems.append(f"weights: must be an object, got {type(weights).__name__}")
        return
    if weights.get("file") != WEIGHTS_NAME:
        problems.append(f"weights.file: must be {WEIGHTS_NAME!r}, got {weights.get('file')!r}")
    sha = weights.get("sha256")
    if not isinstance(sha, str) or not _SHA256.match(sha):
        problems.append(f"weights.sha256: must be 64 lowercase hex digits, got {sha!r}")
    size = weights.get("bytes")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        problems.append(f"weights.bytes: must be a positive integer, got {size!r}")
    if not isinstance(weights.get("dtype"), str):
        problems.append(f"weights.dtype: must be a string, got {weights.get('dtype')!r}")
    tensors = weights.get("tensors")
    if not isinstance(tensors, list) or not tensors or not all(isinstance(t, str) for t in tensors):
        problems.append("weights.tensors: must be a non-empty list of tensor names")
        tensors = None
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        return
    if isinstance(size, int) and path.stat().st_size != size:
        problems.append(
            f"weights.bytes: {WEIGHTS_NAME} has {path.stat().st_size} bytes, {CONFIG_NAME} records {size}"
        )
        return
    try:
        found = sorted(_read_header(path))
    except ValueError as err:
        problems.append(str(err))
        return
    if tensors is not None and found != sorted(tensors):
        problems.append(
            f"weights.tensors: differ from the tensors in {WEIGHTS_NAME} "
            f"(missing {sorted(set(tensors) - set(found))[:5]}, unexpected {sorted(set(found) - set(tensors))[:5]})"
        )
