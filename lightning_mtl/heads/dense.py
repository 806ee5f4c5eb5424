"""``dense``: a per-pixel classifier on ``[batch, C, h, w]`` feature maps."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_mtl.heads._registry import register_head


@register_head("dense")
class DenseHead(nn.Module):
    """3x3 conv + ReLU + 1x1 conv: ``[B, C_in, h, w] -> [B, classes, h, w]``.

    Outputs smaller than the target are resized to it by the ``dense`` task kind.

    Example:
        >>> import torch
        >>> DenseHead(4, 3, hidden=8)(torch.zeros(2, 4, 6, 6)).shape
        torch.Size([2, 3, 6, 6])
    """

    def __init__(self, in_features: int, out_features: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_features, hidden, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_features, kernel_size=1),
        )

    def forward(self, features: Tensor) -> Tensor:
        if features.dim() != 4:
            raise ValueError(
                f"DenseHead expects feature maps [batch, channels, h, w], got {tuple(features.shape)}."
            )
        return self.net(features)  # type: ignore[no-any-return]
