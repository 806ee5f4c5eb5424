"""``MLPBackbone``: a shared multi-layer perceptron for tabular inputs."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class MLPBackbone(nn.Module):
    """``[batch, in_features] -> [batch, hidden[-1]]`` with ReLU, optional LayerNorm and dropout.

    Example:
        >>> import torch
        >>> MLPBackbone(10, hidden=(32, 16))(torch.zeros(4, 10)).shape
        torch.Size([4, 16])
    """

    def __init__(
        self,
        in_features: int,
        hidden: tuple[int, ...] | list[int] = (256, 256),
        dropout: float = 0.1,
        norm: bool = True,
    ) -> None:
        super().__init__()
        self._args = {
            "in_features": int(in_features),
            "hidden": [int(h) for h in hidden],
            "dropout": float(dropout),
            "norm": bool(norm),
        }
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [
                nn.Linear(width, h),
                *([nn.LayerNorm(h)] if norm else []),
                nn.ReLU(),
                nn.Dropout(dropout),
            ]
            width = h
        self.net = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # type: ignore[no-any-return]

    def spec(self) -> dict[str, Any]:
        return {"class_path": "lightning_mtl.backbones.MLPBackbone", "init_args": dict(self._args)}
