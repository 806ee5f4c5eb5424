"""Release artifacts: a folder with ``config.json``, ``model.safetensors`` and a ``README.md`` model card.

:func:`save_pretrained` writes one atomically, :func:`from_pretrained` loads one (from a folder or a
Hugging Face Hub id) strictly and without unpickling anything, :func:`export_checkpoint` turns a Lightning
``.ckpt`` into one (DESIGN.md section 5). :class:`ArtifactConfig` is ``config.json``, read and checked once.

The private modules hold one concern each: ``_card`` (the model card), ``_files`` (atomic folders,
recovery of killed saves), ``_tensors`` (safetensors header, tensor set and base checks), ``_classes``
(class paths in a config), ``_save``, ``_load`` and ``_export``.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from lightning_mtl import MultiTaskModule, Task
    >>> from lightning_mtl.backbones import MLPBackbone
    >>> module = MultiTaskModule(MLPBackbone(4, hidden=(8,)), [Task("stay", kind="regression")])
    >>> folder = save_pretrained(module, Path(tempfile.mkdtemp()) / "stay")
    >>> ArtifactConfig.read(folder / CONFIG_NAME).hparams["tasks"][0]["name"]
    'stay'
"""

from lightning_mtl.artifact._card import CARD_FIELDS
from lightning_mtl.artifact._export import export_checkpoint
from lightning_mtl.artifact._layout import (
    CARD_NAME,
    CONFIG_NAME,
    DEFAULT_MODULE_CLASS,
    LIBRARY_NAME,
    PICKLE_SUFFIXES,
    SCHEMA_VERSION,
    WEIGHTS_NAME,
    ArtifactError,
    PathLike,
)
from lightning_mtl.artifact._load import from_pretrained
from lightning_mtl.artifact._mixin import HubMixin
from lightning_mtl.artifact._save import save_pretrained
from lightning_mtl.artifact.config import ArtifactConfig, WeightsRecord, read_json

__all__ = [
    "CARD_FIELDS",
    "CARD_NAME",
    "CONFIG_NAME",
    "DEFAULT_MODULE_CLASS",
    "LIBRARY_NAME",
    "PICKLE_SUFFIXES",
    "SCHEMA_VERSION",
    "WEIGHTS_NAME",
    "ArtifactConfig",
    "ArtifactError",
    "HubMixin",
    "PathLike",
    "WeightsRecord",
    "export_checkpoint",
    "from_pretrained",
    "read_json",
    "save_pretrained",
]
