"""``CNNEncoder``: a small ResNet-style image encoder with pooled and per-pixel features."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ResidualBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers with a shortcut: the identity, or where the shape changes a 2x2
    average pool (when strided) and a 1x1 conv + BatchNorm (ResNet-D's shortcut, which also keeps
    clear of a heap corruption in PyTorch's CPU backward of strided 1x1 convs on channels-last
    inputs with fewer than 8 channels, seen with torch 2.13)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            pool = (
                nn.AvgPool2d(stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
            )
            self.shortcut = nn.Sequential(
                pool, nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CNNEncoder(nn.Module):
    """Images ``[B, in_channels, H, W]`` -> ``{"pooled": [B, C], "spatial": [B, D, H, W]}``.

    Encoder: a 3x3 conv stem at full resolution, then one stage per further entry of ``widths``:
    ``blocks`` residual blocks, the first of which halves the resolution (``widths=(16, 32, 64)``
    works at 1, 1/2 and 1/4 of the input size). ``pooled`` is what classification heads read: the last
    stage averaged over a ``pool_size`` x ``pool_size`` grid and flattened (``C = widths[-1] ·
    pool_size²``). ``pool_size=1`` is the usual global average; a larger grid keeps where things are,
    which tasks about one part of the image (e.g. "the item at the top left") need.

    Decoder (``decoder_channels=D > 0``): a light top-down path for per-pixel heads, as in a feature
    pyramid: each level is projected to ``D`` channels by a 1x1 conv, and the coarser sum is upsampled
    (bilinear) and added to the next finer level, down to the stem. ``spatial`` is that
    full-resolution map, so a dense head (whose own 3x3 conv smooths the sum) predicts a class per
    input pixel from the stem's fine edges and the last stage's context. The decoder sits in the
    backbone because it needs every level's map; only heads that read ``spatial`` train it. With
    ``decoder_channels=0`` there is no decoder and ``spatial`` is the last stage's map (``D =
    widths[-1]``, at the last stage's resolution; a classification-only model then has no parameter
    its loss does not reach, as DDP requires).
    ``out_features`` gives both widths.

    Inputs are used as given (e.g. ``[0, 1]`` intensities): the stem's BatchNorm makes a fixed input
    normalisation redundant. Weights and activations use the ``channels_last`` memory layout (when
    every width is at least 8), which the CPU convolution kernels run about a third faster on these
    small maps. Any image size works (fully convolutional); ``image_size`` records the
    size the model is meant for (tools read it to build inputs; nothing is resized).

    Example:
        >>> enc = CNNEncoder(widths=(8, 16), decoder_channels=4, pool_size=2, image_size=(12, 12))
        >>> out = enc(torch.rand(2, 1, 12, 12))
        >>> out["pooled"].shape, out["spatial"].shape, enc.out_features
        (torch.Size([2, 64]), torch.Size([2, 4, 12, 12]), {'pooled': 64, 'spatial': 4})
        >>> CNNEncoder(**enc.spec()["init_args"])(torch.rand(1, 1, 12, 12))["spatial"].shape
        torch.Size([1, 4, 12, 12])
    """

    input_keys = ("image",)

    def __init__(
        self,
        in_channels: int = 1,
        widths: Sequence[int] = (16, 32, 64),
        blocks: int = 1,
        decoder_channels: int = 16,
        pool_size: int = 1,
        image_size: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if (
            not widths
            or min(widths) < 1
            or int(blocks) < 1
            or int(decoder_channels) < 0
            or int(pool_size) < 1
        ):
            raise ValueError(
                f"CNNEncoder needs positive widths, blocks >= 1, decoder_channels >= 0 and pool_size >= 1; got "
                f"widths={widths}, blocks={blocks}, decoder_channels={decoder_channels}, pool_size={pool_size}."
            )
        self._args: dict[str, Any] = {
            "in_channels": int(in_channels),
            "widths": widths,
            "blocks": int(blocks),
            "decoder_channels": int(decoder_channels),
            "pool_size": int(pool_size),
            "image_size": [int(s) for s in image_size] if image_size is not None else None,
        }
        self.in_channels = int(in_channels)
        self.pool_size = int(pool_size)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        stages = []
        for i in range(1, len(widths)):
            layers = [ResidualBlock(widths[i - 1], widths[i], stride=2)]
            layers += [ResidualBlock(widths[i], widths[i]) for _ in range(int(blocks) - 1)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        d = int(decoder_channels)
        self.lateral = nn.ModuleList([nn.Conv2d(w, d, 1) for w in widths] if d else [])
        self.out_features = {"pooled": widths[-1] * self.pool_size**2, "spatial": d or widths[-1]}
        # channels_last only with >= 8 channels everywhere: oneDNN's small-channel paths are where
        # PyTorch's CPU kernels have corrupted memory (see ResidualBlock).
        self.memory_format = torch.channels_last if min([*widths, d or 8]) >= 8 else torch.contiguous_format
        self.to(memory_format=self.memory_format)  # type: ignore[call-overload]

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        if image.dim() != 4 or image.shape[1] != self.in_channels or not image.is_floating_point():
            raise ValueError(
                f"CNNEncoder: input 'image' must be a float tensor [batch, {self.in_channels}, height, width] "
                f"(e.g. intensities in [0, 1]), got {image.dtype} {tuple(image.shape)}."
            )
        x = self.stem(image.contiguous(memory_format=self.memory_format))
        maps = [x]
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        pooled = (
            x.mean(dim=(2, 3)) if self.pool_size == 1 else F.adaptive_avg_pool2d(x, self.pool_size).flatten(1)
        )
        if not len(self.lateral):
            return {"pooled": pooled, "spatial": x}
        y = self.lateral[-1](maps[-1])
        for level in range(len(maps) - 2, -1, -1):
            finer = maps[level]
            y = F.interpolate(y, size=finer.shape[-2:], mode="bilinear", align_corners=False)
            y = y + self.lateral[level](finer)
        return {"pooled": pooled, "spatial": y}

    def spec(self) -> dict[str, Any]:
        return {"class_path": "lightning_mtl.backbones.CNNEncoder", "init_args": dict(self._args)}
