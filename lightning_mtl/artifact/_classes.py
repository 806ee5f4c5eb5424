"""Class paths in an artifact: which classes ``config.json`` may name, the module class to rebuild, and the
rebuild itself. (Kept together, one function each, so the spec resolver can replace their bodies.)"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from torch import nn

from lightning_mtl._registry import import_object
from lightning_mtl.artifact._layout import DEFAULT_MODULE_CLASS, ArtifactError

if TYPE_CHECKING:
    from lightning_mtl.module import MultiTaskModule


def _importable_class(module: nn.Module) -> str:
    """Dotted path of the module's class, or of its nearest base that can be imported by that path
    (a class defined in a script run as ``__main__`` cannot be)."""
    for cls in type(module).__mro__:
        path = f"{cls.__module__}.{cls.__qualname__}"
        if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
            continue
        try:
            if import_object(path) is cls:
                return path
        except ImportError:
            continue
    return "lightning_mtl.module.MultiTaskModule"


def _check_class_paths(value: Any, path: Path) -> None:
    """Every ``class_path`` in the config must name an ``nn.Module`` class, so a crafted config.json
    cannot make the loader call arbitrary functions (e.g. ``subprocess.run``)."""
    if isinstance(value, Mapping):
        class_path = value.get("class_path")
        if isinstance(class_path, str):
            try:
                obj = import_object(class_path)
            except ImportError as err:
                raise ArtifactError(path, f"class_path {class_path!r} cannot be imported ({err}).") from None
            if not (inspect.isclass(obj) and issubclass(obj, nn.Module)):
                raise ArtifactError(
                    path,
                    f"class_path {class_path!r} is not an nn.Module class; artifacts may only build modules.",
                )
        for item in value.values():
            _check_class_paths(item, path)
    elif isinstance(value, list):
        for item in value:
            _check_class_paths(item, path)


def _recorded_module_class(config: dict[str, Any], path: Path) -> type[MultiTaskModule]:
    """The module class recorded in ``config.json`` if it lies in ``lightning_mtl``, else the default one;
    imported by name (``hub`` never imports ``module``: no import cycle), and refused unless it is a
    :class:`HubMixin` ``nn.Module``."""
    from lightning_mtl.artifact._mixin import HubMixin

    recorded = config.get("module_class")
    name = recorded if isinstance(recorded, str) and recorded.startswith("lightning_mtl.") else None
    try:
        cls = import_object(name or DEFAULT_MODULE_CLASS)
    except ImportError:
        cls = import_object(DEFAULT_MODULE_CLASS)
    if not (inspect.isclass(cls) and issubclass(cls, HubMixin) and issubclass(cls, nn.Module)):
        raise ArtifactError(path, f"module_class {recorded!r} is not a lightning_mtl module class.")
    return cast("type[MultiTaskModule]", cls)


def _build(
    module_class: type[MultiTaskModule], hparams: dict[str, Any], base: Any, config_path: Path
) -> MultiTaskModule:
    params = inspect.signature(module_class.__init__).parameters
    unknown = sorted(set(hparams) - set(params))
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise ArtifactError(
            config_path,
            f"hparams {unknown} are unknown to {module_class.__name__} of this version; the artifact needs a "
            "newer lightning-mtl (or the module class it was saved from).",
        )
    kwargs = dict(hparams)
    if base:
        if not isinstance(base, dict) or not {"ref", "fingerprint", "tensors"} <= set(base):
            raise ArtifactError(config_path, "'base' must hold 'ref', 'fingerprint' and 'tensors'.")
        spec = hparams.get("backbone") or {}
        init_args = {k: v for k, v in (spec.get("init_args") or {}).items() if k != "config"}
        try:
            cls = import_object(spec["class_path"])
            kwargs["backbone"] = cls.from_pretrained(base["ref"], **init_args)
        except Exception as err:
            raise ArtifactError(
                config_path,
                f"this artifact stores only the trained tensors; building its base model {base['ref']!r} "
                f"failed: {err}",
            ) from err
    try:
        return module_class(**kwargs)
    except Exception as err:
        raise ArtifactError(
            config_path,
            f"cannot rebuild {module_class.__name__} from its hparams: {type(err).__name__}: {err}",
        ) from err
