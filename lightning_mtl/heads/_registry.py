"""The head registry: ``@register_head("name")``, ``list_heads()``, ``create_head()``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lightning_mtl._registry import Registry

HEAD_REGISTRY: Registry[type[nn.Module]] = Registry("head")


def register_head(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Register a head class under ``name``; registering a taken name raises ``ValueError``.

    A head is an ``nn.Module`` built as ``Head(in_features, out_features, **head_kwargs)``.

    Example:
        >>> import torch
        >>> @register_head("doc_example_scaled")
        ... class Scaled(nn.Linear):
        ...     def forward(self, x):
        ...         return 2 * super().forward(x)
        >>> "doc_example_scaled" in list_heads()
        True
    """
    return HEAD_REGISTRY.register(name)


def list_heads(filter: str | None = None) -> list[str]:
    """Registered head names, optionally filtered with an fnmatch pattern.

    Example:
        >>> list_heads("lin*")
        ['linear']
    """
    return HEAD_REGISTRY.list(filter)


def create_head(name: str, in_features: int, out_features: int, **kwargs: Any) -> nn.Module:
    """Build the registered head ``name``.

    Example:
        >>> create_head("linear", 8, 3)
        LinearHead(
          (proj): Linear(in_features=8, out_features=3, bias=True)
        )
    """
    cls = HEAD_REGISTRY.get(name)
    try:
        return cls(in_features, out_features, **kwargs)
    except TypeError as err:
        raise TypeError(f"Head {name!r} ({cls.__name__}) rejected its arguments {kwargs}: {err}") from err
