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
from lightning_mtl.balancing.dwa import DynamicWeightAverage
from lightning_mtl.balancing.equal import EqualWeighting
from lightning_mtl.balancing.famo import FAMO
from lightning_mtl.balancing.gls import GeometricLossStrategy
from lightning_mtl.balancing.gradnorm import GradNorm
from lightning_mtl.balancing.rlw import RandomLossWeighting
from lightning_mtl.balancing.static import StaticWeighting
from lightning_mtl.balancing.uncertainty import UncertaintyWeighting

__all__ = [
    "FAMO",
    "Balanced",
    "Balancer",
    "DynamicWeightAverage",
    "EqualWeighting",
    "GeometricLossStrategy",
    "GradNorm",
    "RandomLossWeighting",
    "StaticWeighting",
    "UncertaintyWeighting",
    "create_balancer",
    "list_balancers",
    "register_balancer",
]
