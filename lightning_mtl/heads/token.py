"""``token``: a per-token classifier on ``[batch, seq, hidden]`` features."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_mtl.heads._registry import register_head


@register_head("token")
class TokenHead(nn.Module):
    """Dropout + linear applied at every position: ``[B, L, H] -> [B, L, C]``.

    Example:
        >>> import torch
        >>> TokenHead(8, 5)(torch.zeros(2, 7, 8)).shape
        torch.Size([2, 7, 5])
    """

    def __init__(self, in_features: int, out_features: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(in_features, out_features)

    def forward(self, features: Tensor) -> Tensor:
        if features.dim() != 3:
            raise ValueError(
                f"TokenHead expects token features [batch, seq, hidden], got {tuple(features.shape)}; "
                "use a backbone that returns token-level features (HFEncoder returns them as 'tokens')."
            )
        return self.proj(self.dropout(features))  # type: ignore[no-any-return]
