"""Class paths in an artifact: which classes ``config.json`` may name, the module class to rebuild, and the
rebuild itself. (Kept together, one function each, so the spec resolver can replace their bodies.)"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_mtl.artifact._layout import DEFAULT_MODULE_CLASS, ArtifactError
from lightning_mtl.specs import check_specs, is_trusted, resolve_class

if TYPE_CHECKING:
    from lightning_mtl.module import MultiTaskModule


def _importable_class(module: nn.Module) -> str:
    """Dotted path of the module's class, or of its nearest base that can be found again by that path
    (a class defined in a script run as ``__main__`` or in a function cannot be). Nothing is imported:
    the class's module is already loaded."""
    for cls in type(module).__mro__:
        if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
            continue
        found: Any = sys.modules.get(cls.__module__)
        for part in cls.__qualname__.split("."):
            found = getattr(found, part, None)
        if found is cls:
            return f"{cls.__module__}.{cls.__qualname__}"
    return DEFAULT_MODULE_CLASS


def _check_class_paths(value: Any, path: Path) -> None:
    """Every ``class_path`` in the config must lie in a trusted package (checked before import) and name an
    ``nn.Module`` class (checked before any call), so a crafted config.json can neither run a module's
    import-time code nor call a function such as ``subprocess.run``."""
    try:
        check_specs(value, nn.Module, "hparams")
    except (ImportError, ValueError) as err:
        raise ArtifactError(path, str(err)) from None


def _recorded_module_class(config: dict[str, Any], path: Path) -> type[MultiTaskModule]:
    """The module class recorded in ``config.json`` when it lies in a trusted package (``lightning_mtl`` or
    one given to :func:`~lightning_mtl.trust`), else ``MultiTaskModule`` with a warning; resolved by name
    (``artifact`` never imports ``module`` at import time: no cycle), refused unless it is a
    ``MultiTaskModule`` class."""
    from lightning_mtl.module import MultiTaskModule

    recorded = config.get("module_class")
    if not isinstance(recorded, str) or recorded == DEFAULT_MODULE_CLASS:
        return MultiTaskModule
    if not is_trusted(recorded.rpartition(".")[0]):
        rank_zero_warn(
            f"{path}: module_class {recorded!r} lies outside the trusted packages, so it was not imported; the "
            f"model is rebuilt as MultiTaskModule (same weights, the base class's behaviour). To use your "
            f"class, call lightning_mtl.trust({recorded.split('.')[0]!r}) first, or pass module_class=."
        )
        return MultiTaskModule
    try:
        return cast("type[MultiTaskModule]", resolve_class(recorded, MultiTaskModule, "module_class"))
    except (ImportError, ValueError) as err:
        raise ArtifactError(path, str(err)) from None


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
            cls: Any = resolve_class(spec["class_path"], nn.Module, "backbone")
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
