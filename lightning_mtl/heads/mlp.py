"""``mlp``: a small multi-layer perceptron head."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_mtl.heads._registry import register_head


@register_head("mlp")
class MLPHead(nn.Module):
    """``num_layers`` hidden layers of width ``hidden`` (GELU, dropout), then a linear output.

    Example:
        >>> import torch
        >>> MLPHead(8, 2, hidden=16, num_layers=2)(torch.zeros(4, 8)).shape
        torch.Size([4, 2])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: int = 256,
        num_layers: int = 1,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLPHead needs num_layers >= 1, got {num_layers}.")
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features)  # type: ignore[no-any-return]
