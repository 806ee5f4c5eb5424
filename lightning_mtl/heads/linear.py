"""``linear``: dropout + one linear layer on pooled features."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_mtl.heads._registry import register_head


@register_head("linear")
class LinearHead(nn.Module):
    """``[batch, in_features] -> [batch, out_features]`` (any leading dims work).

    Example:
        >>> import torch
        >>> LinearHead(8, 3)(torch.zeros(2, 8)).shape
        torch.Size([2, 3])
    """

    def __init__(self, in_features: int, out_features: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.proj = nn.Linear(in_features, out_features)

    def forward(self, features: Tensor) -> Tensor:
        if self.dropout is not None:
            features = self.dropout(features)
        return self.proj(features)  # type: ignore[no-any-return]
