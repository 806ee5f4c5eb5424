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
from lightning_mtl.balancing.db_mtl import DBMTL
from lightning_mtl.balancing.dwa import DynamicWeightAverage
from lightning_mtl.balancing.equal import EqualWeighting
from lightning_mtl.balancing.famo import FAMO
from lightning_mtl.balancing.gls import GeometricLossStrategy
from lightning_mtl.balancing.graddrop import GradDrop
from lightning_mtl.balancing.gradnorm import GradNorm
from lightning_mtl.balancing.gradvac import GradVac
from lightning_mtl.balancing.imtl import IMTLG
from lightning_mtl.balancing.mgda import MGDA, MGDAUB
from lightning_mtl.balancing.pcgrad import PCGrad
from lightning_mtl.balancing.rlw import RandomLossWeighting
from lightning_mtl.balancing.static import StaticWeighting
from lightning_mtl.balancing.uncertainty import UncertaintyWeighting

__all__ = [
    "DBMTL",
    "FAMO",
    "IMTLG",
    "MGDA",
    "MGDAUB",
    "Balanced",
    "Balancer",
    "DynamicWeightAverage",
    "EqualWeighting",
    "GeometricLossStrategy",
    "GradDrop",
    "GradNorm",
    "GradVac",
    "PCGrad",
    "RandomLossWeighting",
    "StaticWeighting",
    "UncertaintyWeighting",
    "create_balancer",
    "list_balancers",
    "register_balancer",
]
