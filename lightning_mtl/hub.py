"""Release artifacts (``config.json`` + ``model.safetensors`` + ``README.md``): the public face of
:mod:`lightning_mtl.artifact`, kept under this name.

Example:
    >>> from lightning_mtl.hub import save_pretrained, from_pretrained
    >>> from lightning_mtl.artifact import save_pretrained as same
    >>> save_pretrained is same
    True
"""

from lightning_mtl.artifact import (
    CARD_FIELDS,
    CARD_NAME,
    CONFIG_NAME,
    DEFAULT_MODULE_CLASS,
    LIBRARY_NAME,
    PICKLE_SUFFIXES,
    SCHEMA_VERSION,
    WEIGHTS_NAME,
    ArtifactConfig,
    ArtifactError,
    HubMixin,
    PathLike,
    export_checkpoint,
    from_pretrained,
    save_pretrained,
)
from lightning_mtl.artifact._layout import HUB_ID as _HUB_ID  # noqa: F401  (earlier import path)
from lightning_mtl.artifact._tensors import _read_header  # noqa: F401  (earlier import path)

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
    "export_checkpoint",
    "from_pretrained",
    "save_pretrained",
]
