"""Task balancing: loss weighting and gradient aggregation behind one registry.

Add a method by subclassing :class:`Balancer` in one file and decorating it with
:func:`register_balancer`."""

from lightning_mtl.balancing.base import (
    Balanced,
    Balancer,
    create_balancer,
    list_balancers,
    register_balancer,
)
from lightning_mtl.balancing.equal import EqualWeighting
from lightning_mtl.balancing.static import StaticWeighting

__all__ = [
    "Balanced",
    "Balancer",
    "EqualWeighting",
    "StaticWeighting",
    "create_balancer",
    "list_balancers",
    "register_balancer",
]
