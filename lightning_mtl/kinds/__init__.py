"""Task kinds: the defaults (head, loss, metrics, post-processing) a :class:`~lightning_mtl.Task` takes
from its ``kind``. Add a kind by subclassing :class:`TaskKind` and decorating it with
:func:`register_kind`."""

from lightning_mtl.kinds.base import (
    IGNORE_INDEX,
    LOSSES,
    Masked,
    Prepared,
    TaskKind,
    TaskLoss,
    get_kind,
    list_kinds,
    register_kind,
)
from lightning_mtl.kinds.binary import Binary
from lightning_mtl.kinds.dense import Dense
from lightning_mtl.kinds.multiclass import Multiclass
from lightning_mtl.kinds.multilabel import Multilabel
from lightning_mtl.kinds.regression import Regression
from lightning_mtl.kinds.token import Token

__all__ = [
    "IGNORE_INDEX",
    "LOSSES",
    "Binary",
    "Dense",
    "Masked",
    "Multiclass",
    "Multilabel",
    "Prepared",
    "Regression",
    "TaskKind",
    "TaskLoss",
    "Token",
    "get_kind",
    "list_kinds",
    "register_kind",
]
