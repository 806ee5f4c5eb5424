"""``HubMixin``: ``save_pretrained`` / ``from_pretrained`` as methods of ``MultiTaskModule``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from typing_extensions import Self

from lightning_mtl.artifact._layout import PathLike
from lightning_mtl.artifact._load import from_pretrained
from lightning_mtl.artifact._save import save_pretrained

if TYPE_CHECKING:
    from lightning_mtl.module import MultiTaskModule


class HubMixin:
    """Adds :meth:`save_pretrained` and :meth:`from_pretrained` (release artifacts) to ``MultiTaskModule``."""

    def save_pretrained(self, directory: PathLike, **kwargs: Any) -> Path:
        """Write a release artifact folder; see :func:`lightning_mtl.hub.save_pretrained`."""
        return save_pretrained(cast("MultiTaskModule", self), directory, **kwargs)

    @classmethod
    def from_pretrained(cls, ref: PathLike, **kwargs: Any) -> Self:
        """Load a release artifact folder or hub id; see :func:`lightning_mtl.hub.from_pretrained`."""
        return cast(Self, from_pretrained(ref, module_class=cast(Any, cls), **kwargs))
