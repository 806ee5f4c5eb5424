"""Task balancing: loss weighting and gradient aggregation behind one registry.

Add a method by subclassing :class:`Balancer` in one file and decorating it with
:func:`register_balancer`."""

from lightning_mtl.balancing.aligned_mtl import AlignedMTL
from lightning_mtl.balancing.base import (
    Balanced,
    Balancer,
    create_balancer,
    list_balancers,
    register_balancer,
)
from lightning_mtl.balancing.cagrad import CAGrad
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
from lightning_mtl.balancing.nash_mtl import NashMTL
from lightning_mtl.balancing.pcgrad import PCGrad
from lightning_mtl.balancing.rlw import RandomLossWeighting
from lightning_mtl.balancing.static import StaticWeighting
from lightning_mtl.balancing.uncertainty import UncertaintyWeighting
from lightning_mtl.balancing.upgrad import UPGrad

__all__ = [
    "DBMTL",
    "FAMO",
    "IMTLG",
    "MGDA",
    "MGDAUB",
    "AlignedMTL",
    "Balanced",
    "Balancer",
    "CAGrad",
    "DynamicWeightAverage",
    "EqualWeighting",
    "GeometricLossStrategy",
    "GradDrop",
    "GradNorm",
    "GradVac",
    "NashMTL",
    "PCGrad",
    "RandomLossWeighting",
    "StaticWeighting",
    "UPGrad",
    "UncertaintyWeighting",
    "create_balancer",
    "list_balancers",
    "register_balancer",
]
