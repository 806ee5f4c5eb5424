"""Lightning checkpoints: turn a trusted ``.ckpt`` into a release artifact (read with ``weights_only=True``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lightning_mtl.artifact._classes import _check_class_paths
from lightning_mtl.artifact._layout import ArtifactError, PathLike
from lightning_mtl.artifact._save import save_pretrained

if TYPE_CHECKING:
    from lightning_mtl.module import MultiTaskModule


def export_checkpoint(
    ckpt_path: PathLike,
    directory: PathLike,
    *,
    module_class: type[MultiTaskModule] | None = None,
    **save_kwargs: Any,
) -> Path:
    """Turn a Lightning ``.ckpt`` of a :class:`~lightning_mtl.MultiTaskModule` into a release artifact.

    Only the weights and hyper-parameters are kept; optimizer, scheduler, loop and callback states are
    dropped. The checkpoint is read with ``torch.load(weights_only=True)`` (PyTorch's restricted
    unpickler: tensors and plain containers only). This is the *local, trusted-checkpoint* path:
    convert your own checkpoints here, and share the resulting folder, which loads without pickle.
    ``module_class``: the class to rebuild (default ``MultiTaskModule``). ``save_kwargs`` go to
    :func:`save_pretrained`; the checkpoint's epoch and global step are recorded under ``extra["checkpoint"]``.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise ArtifactError(path, "no such checkpoint file.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ArtifactError(path, f"cannot be read with torch.load(weights_only=True): {err}") from err
    if not isinstance(ckpt, dict) or not {"state_dict", "hyper_parameters"} <= set(ckpt):
        raise ArtifactError(
            path,
            "is not a Lightning checkpoint of a MultiTaskModule (it lacks 'state_dict' or 'hyper_parameters').",
        )
    provenance = {k: ckpt[k] for k in ("epoch", "global_step", "pytorch-lightning_version") if k in ckpt}
    _check_class_paths(ckpt["hyper_parameters"], path)  # before any class is built from them
    del ckpt
    if module_class is None:
        from lightning_mtl.module import MultiTaskModule

        module_class = MultiTaskModule
    cls = module_class
    module = cls.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    extra = dict(save_kwargs.pop("extra", None) or {})
    extra.setdefault("checkpoint", {"file": path.name, **provenance})
    return save_pretrained(module, directory, extra=extra, **save_kwargs)
