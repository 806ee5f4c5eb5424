"""Task heads. Add one by writing an ``nn.Module`` taking ``(in_features, out_features, **kwargs)``
and decorating it with :func:`register_head`."""

from lightning_mtl.heads._registry import create_head, list_heads, register_head
from lightning_mtl.heads.dense import DenseHead
from lightning_mtl.heads.linear import LinearHead
from lightning_mtl.heads.mlp import MLPHead
from lightning_mtl.heads.token import TokenHead

__all__ = ["DenseHead", "LinearHead", "MLPHead", "TokenHead", "create_head", "list_heads", "register_head"]
