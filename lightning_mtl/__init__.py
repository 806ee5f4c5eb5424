"""lightning-mtl: multi-task learning for PyTorch Lightning.

Example:
    >>> from lightning_mtl import MultiTaskModule, Task
    >>> Task("sentiment", kind="binary", labels=["rotten", "fresh"]).out_features
    1
"""

from lightning_mtl.balancing import Balancer, list_balancers, register_balancer
from lightning_mtl.config_checks import BackboneInputError
from lightning_mtl.data import MultiTaskDataModule
from lightning_mtl.heads import list_heads, register_head
from lightning_mtl.kinds import list_kinds, register_kind
from lightning_mtl.module import MultiTaskModule
from lightning_mtl.specs import trust, trusted, untrust
from lightning_mtl.tasks import Task

__version__ = "0.1.0"

__all__ = [
    "BackboneInputError",
    "Balancer",
    "MultiTaskDataModule",
    "MultiTaskModule",
    "Task",
    "__version__",
    "list_balancers",
    "list_heads",
    "list_kinds",
    "register_balancer",
    "register_head",
    "register_kind",
    "trust",
    "trusted",
    "untrust",
]
