"""Saving: a module as a release artifact folder (``config.json``, ``model.safetensors``, ``README.md``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch.utilities import rank_zero_warn
from safetensors.torch import save_file
from torch import Tensor, nn

from lightning_mtl.artifact._card import _clean_card, _render_card
from lightning_mtl.artifact._classes import _check_class_paths, _importable_class
from lightning_mtl.artifact._files import _atomic_directory, _fsync_file, _sha256_file, _write_text
from lightning_mtl.artifact._layout import (
    CARD_NAME,
    CONFIG_NAME,
    LIBRARY_NAME,
    SCHEMA_VERSION,
    WEIGHTS_NAME,
    ArtifactError,
    PathLike,
)
from lightning_mtl.artifact._tensors import _contiguous_state, _fingerprint
from lightning_mtl.artifact.config import ArtifactConfig, WeightsRecord, _json_able

if TYPE_CHECKING:
    from lightning_mtl.module import MultiTaskModule


def save_pretrained(
    module: MultiTaskModule,
    directory: PathLike,
    *,
    metrics: Mapping[str, Any] | None = None,
    card: Mapping[str, Any] | None = None,
    trainable_only: bool = False,
    base: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``module`` as a release artifact folder and return its path.

    Args:
        module: the module; its backbone must be stored as a spec (e.g. ``HFEncoder``, ``MLPBackbone``).
        directory: the folder to write. It is written atomically: everything goes to a temporary
            sibling folder (fsynced) that is swapped with ``directory`` at the end, so at every instant
            ``directory`` holds the complete previous artifact or the complete new one, even if the
            process is killed; leftovers of killed saves are removed by the next save. An existing
            folder is replaced as a whole; one that is neither empty nor an artifact is refused.
        metrics: ``{task: {metric: value}}``, or flat Lightning results such as
            ``trainer.validate(...)[0]`` (``"val/<task>/<metric>"`` keys).
        card: model-card fields: ``license``, ``datasets``, ``training_data``, ``recipe``,
            ``intended_use``, ``limitations``, ``tags``, ``language``, ``name``, ``description``.
        trainable_only: store only the trainable backbone parameters (plus heads, balancer, losses
            and backbone buffers); the frozen rest is reloaded from ``base`` and verified by fingerprint.
        base: reference of the pretrained backbone (``pkg:`` ref, folder or hub id) for
            ``trainable_only``; default: the backbone's ``source``.
        extra: more JSON-able fields stored under ``extra`` in ``config.json``.

    Example:
        >>> import tempfile
        >>> from lightning_mtl import MultiTaskModule, Task
        >>> from lightning_mtl.backbones import MLPBackbone
        >>> module = MultiTaskModule(MLPBackbone(4, hidden=(8,)), [Task("risk", kind="binary", labels=["low", "high"])])
        >>> path = save_pretrained(module, Path(tempfile.mkdtemp()) / "risk-model", metrics={"risk": {"auroc": 0.91}})
        >>> sorted(p.name for p in path.iterdir())
        ['README.md', 'config.json', 'model.safetensors']
        >>> import torch
        >>> from lightning_mtl.artifact import from_pretrained
        >>> x = torch.randn(3, 4)
        >>> from_pretrained(path).predict(x) == module.predict(x)
        True
    """
    import lightning_mtl

    if base is not None and not trainable_only:
        raise ValueError(
            "base= names where the frozen weights come from; it is only used with trainable_only=True."
        )
    target = Path(directory)
    hparams = _json_hparams(module, target / CONFIG_NAME)
    tasks = [t["name"] for t in hparams["tasks"]]
    state = _contiguous_state(module)
    stored, base_info = (state, None)
    if trainable_only:
        stored, base_info = _split_trainable(module, state, base)
    spec = hparams["backbone"]
    init_args = dict(spec.get("init_args") or {})
    preprocessing = {
        "tokenizer": init_args.get("tokenizer"),
        "max_length": init_args.get("max_length"),
        "input_keys": list(hparams.get("input_keys") or getattr(module.backbone, "input_keys", None) or []),
    }
    for what, ref in (("tokenizer", preprocessing["tokenizer"]), ("base", base_info and base_info["ref"])):
        if isinstance(ref, str) and not ref.startswith("pkg:") and Path(ref).exists():
            rank_zero_warn(
                f"save_pretrained: the {what} reference {ref!r} is a local path; the artifact will only "
                "load where that path exists. Prefer a hub id or a `pkg:` reference for releases."
            )
    library = {"name": LIBRARY_NAME, "version": lightning_mtl.__version__}
    module_class = _importable_class(module)
    clean_metrics, clean_card = _clean_metrics(metrics, tasks), _clean_card(card)
    clean_extra = _json_able(dict(extra or {}), "extra")
    with _atomic_directory(target) as tmp:
        weights_path = tmp / WEIGHTS_NAME
        save_file(stored, str(weights_path), metadata={"format": "pt", "library": LIBRARY_NAME})
        _fsync_file(weights_path)
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in stored.values()})
        config = ArtifactConfig(
            schema_version=SCHEMA_VERSION,
            library=library,
            module_class=module_class,
            hparams=hparams,
            preprocessing=preprocessing,
            metrics=clean_metrics,
            card=clean_card,
            weights=WeightsRecord(
                file=WEIGHTS_NAME,
                sha256=_sha256_file(weights_path),
                bytes=weights_path.stat().st_size,
                dtype=dtypes[0] if len(dtypes) == 1 else "mixed",
                tensors=tuple(sorted(stored)),
            ),
            base=base_info,
            extra=clean_extra,
        )
        _write_text(tmp / CONFIG_NAME, config.to_json())
        _write_text(tmp / CARD_NAME, _render_card(config.to_dict(), target.name))
    return target


def _json_hparams(module: nn.Module, config_path: Path) -> dict[str, Any]:
    hparams = dict(getattr(module, "hparams", {}) or {})
    if "tasks" not in hparams or "backbone" not in hparams:
        raise TypeError(f"save_pretrained expects a MultiTaskModule, got {type(module).__name__}.")
    if hparams["backbone"] is None:
        raise ArtifactError(
            config_path,
            f"the backbone ({hparams.get('backbone_class')}) has no `spec()`, so config.json could not rebuild it. "
            "Use a backbone with a spec (HFEncoder, MLPBackbone) or give yours a `spec()` method returning "
            "{'class_path': ..., 'init_args': ...}.",
        )
    hparams = _json_able(hparams, "hyper-parameter")
    _check_class_paths(hparams, config_path)
    return hparams


def _split_trainable(
    module: MultiTaskModule, state: dict[str, Tensor], base: str | None
) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """Tensors to store (everything except frozen backbone parameters) and the record of the rest."""
    params = dict(module.named_parameters(remove_duplicate=False))
    frozen = {n for n in state if n.startswith("backbone.") and n in params and not params[n].requires_grad}
    if not frozen:
        rank_zero_warn(
            "save_pretrained(trainable_only=True): every backbone parameter is trainable, so nothing would "
            "come from the base model; saving the full model instead."
        )
        return state, None
    spec = module.hparams["backbone"]
    if not hasattr(type(module.backbone), "from_pretrained"):
        raise TypeError(
            f"trainable_only=True needs a backbone that reloads its frozen weights with `from_pretrained` "
            f"(e.g. HFEncoder); {spec['class_path']} has none. Save the full model instead."
        )
    ref = base if base is not None else getattr(module.backbone, "source", None)
    if not ref:
        raise ValueError(
            "trainable_only=True needs the reference of the pretrained backbone: pass base=<pkg: ref, folder "
            "or hub id> (the backbone has no `source`, e.g. it was built from a config)."
        )
    base_state = {n: state[n] for n in sorted(frozen)}
    fingerprint, tensors = _fingerprint(base_state)
    stored = {n: t for n, t in state.items() if n not in frozen}
    return stored, {"ref": str(ref), "fingerprint": fingerprint, "tensors": tensors}


def _clean_metrics(metrics: Mapping[str, Any] | None, tasks: list[str]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, Mapping):
            task, items = str(key), [(str(k), v) for k, v in value.items()]
        else:
            parts = str(key).split("/")
            if len(parts) == 3:
                task, items = parts[1], [(f"{parts[0]}/{parts[2]}", value)]
            elif len(parts) == 2:
                task, items = parts[0], [(parts[1], value)]
            else:
                raise ValueError(
                    f"metrics: cannot tell the task of {key!r}; pass {{task: {{metric: value}}}} or "
                    "'<stage>/<task>/<metric>' keys as Lightning logs them."
                )
        if task not in tasks:
            raise ValueError(f"metrics given for unknown task {task!r} (key {key!r}); the tasks are {tasks}.")
        for name, v in items:
            try:
                number = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"metrics[{task!r}][{name!r}] must be a number, got {v!r}.") from None
            out.setdefault(task, {})[name] = number if math.isfinite(number) else None
    return out
